"""On a CUDA device: a real NCCL group takes what the helpers hand it, and amp=auto trains in what the GPU
supports. (Everything around these paths is tested on the CPU in test_collectives.py and test_precision.py.)
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from prism_vfm.metrics.multitask import MultiTaskMeter
from prism_vfm.train import distributed
from prism_vfm.train.precision import MixedPrecision, choose_precision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL and GPU precision need CUDA")


@pytest.fixture
def nccl_group(tmp_path):
    torch.cuda.set_device(0)
    dist.init_process_group(
        "nccl",
        init_method=f"file://{tmp_path / 'store'}",
        rank=0,
        world_size=1,
        device_id=torch.device("cuda", 0),
    )
    yield
    dist.destroy_process_group()


def test_nccl_group_reduces_whatever_the_helpers_are_given(nccl_group):
    assert distributed.collective_device() == torch.device("cuda", 0)
    # A CPU count, as the Stage-1 logging hands over, and a meter's CPU state (no batch seen on this rank).
    assert float(distributed.all_reduce_sum(torch.tensor(7))) == 7.0
    meter = MultiTaskMeter("pascalcontext", ["semseg", "normals"])
    meter.load_state(distributed.all_reduce_sums(meter.state()))
    assert all(v.device.type == "cuda" for v in meter.state().values())
    assert distributed.all_gather_objects({"counts": [1, 2]}) == [{"counts": [1, 2]}]
    with pytest.raises(
        RuntimeError, match="a tensor on cpu handed to a collective of the nccl process group"
    ):
        distributed.average_floating_buffers(nn.BatchNorm1d(2))
    distributed.average_floating_buffers(nn.BatchNorm1d(2).cuda())
    distributed.barrier()


def test_auto_precision_is_what_this_gpu_computes_natively():
    major, _ = torch.cuda.get_device_capability(0)
    expected = "bf16" if major >= 8 else "fp16" if major >= 7 else "fp32"
    assert choose_precision("auto", torch.device("cuda", 0)) == expected


@pytest.mark.parametrize("amp", ["auto", "fp16"])
def test_a_training_step_on_the_gpu_in_its_precision(amp):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    precision = MixedPrecision(amp, torch.device("cuda", 0))
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        with precision.autocast():
            loss = model(torch.randn(8, 16, device="cuda")).float().square().mean()
        precision.backward(loss)
        norm = precision.step(opt, model.parameters(), 1.0)
        opt.zero_grad(set_to_none=True)
    assert torch.isfinite(norm) and torch.isfinite(loss)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))

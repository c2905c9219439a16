"""The video data loader's rate per decoder: clips/s of decode + augment, PyAV against decord, side by side.

Generated videos of realistic size (10 s at 320×240, 25 fps, moving texture) in H.264 (MP4) and MPEG-4
Part 2 (AVI, as UCF101 and HMDB51 ship), read as training clips: TSN sampling of 32 frames, the released
augmentation to 224², CLIP normalisation (``VideoDataset`` in train mode, one decoder thread: the rate of
one loader worker). Each call reads one clip of the next video; the files are in the page cache (written
just before), so disk speed is not part of it. Decode alone (the sampled frames as RGB arrays) is timed
as well, to tell the decoder's share from the augmentation's.

In the same run, the rate the loader must keep up with: VidPrism's whole training step (``--step-tower``,
default ViT-B/16 with random weights, activation checkpointing, the released head and loss, AdamW) on one
clip of the same frames and size, on this CPU in fp32 (``--step-repeats`` timed steps after one warm-up:
a 32-frame ViT-B/16 step takes about a minute on two cores). Per decoder and codec it prints the ratio
loader / step (clips one loader worker decodes while the step trains on one) and the loader workers a
step needs, ``ceil(step rate / worker rate)``; ``--step-rate`` sizes the workers for a step rate measured
elsewhere as well (e.g. clips/s per GPU from ``gpu_check.py``'s ``vidprism_step``).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import harness  # noqa: E402
from prism_vfm.video import HeadConfig, VidPrism, released_loss  # noqa: E402
from prism_vfm.video.backbone import TowerConfig, tower_config  # noqa: E402
from prism_vfm.video.data import sampling  # noqa: E402
from prism_vfm.video.data.dataset import VideoDataset  # noqa: E402
from prism_vfm.video.data.decode import open_video  # noqa: E402
from prism_vfm.video.data.lists import VideoSample  # noqa: E402
from prism_vfm.video.data.synthetic import synthetic_frames, write_video  # noqa: E402

CODECS = {"h264": ".mp4", "mpeg4": ".avi"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_args(parser)
    parser.add_argument("--videos", type=int, default=4, help="videos per codec (default 4)")
    parser.add_argument("--seconds", type=float, default=10.0, help="video length (default 10 s at 25 fps)")
    parser.add_argument("--frames", type=int, default=32, help="frames per clip (default 32)")
    parser.add_argument("--decoders", default="pyav,decord", help="comma-separated (default pyav,decord)")
    parser.add_argument("--step-tower", default="ViT-B/16", help="the training step's tower ('none': skip)")
    parser.add_argument("--step-repeats", type=int, default=2, help="timed training steps (default 2)")
    parser.add_argument("--step-rate", type=float, default=0.0, help="also size workers for this clips/s")
    args = parser.parse_args(argv)
    if harness.in_processes(args, argv):
        return
    device = harness.setup(args)
    width, height, size, scale = (320, 240, 224, 256) if not args.quick else (64, 48, 32, 36)
    seconds = args.seconds if not args.quick else 1.0
    frames = args.frames if not args.quick else 8
    decoders = [d for d in args.decoders.split(",") if d]
    if "decord" in decoders and importlib.util.find_spec("decord") is None:
        print("decord: not installed (pip install decord), measured PyAV only")
        decoders.remove("decord")
    harness.describe(args, device)
    print(
        f"videos: {args.videos} per codec, {seconds:g} s at {width}x{height}, 25 fps, {int(seconds * 25)} "
        f"frames; clips: {frames} frames (TSN), augmented to {size}² (shorter side {scale}); "
        "one decoder thread"
    )
    with tempfile.TemporaryDirectory() as tmp:
        cases: list[harness.Case] = []
        for codec, ext in CODECS.items():
            samples = []
            for v in range(args.videos):
                pixels = synthetic_frames(int(seconds * 25), (height, width), label=v, noise_seed=v)
                write_video(Path(tmp) / f"{codec}_{v}{ext}", pixels, codec)
                samples.append(VideoSample(f"{codec}_{v}{ext}", 0))
            for decoder in decoders:
                data = VideoDataset(
                    tmp, samples, "train", num_frames=frames, size=size, scale_size=scale, decoder=decoder
                )
                counter = itertools.count()

                def clip(data: VideoDataset = data, counter: itertools.count = counter) -> None:
                    data[next(counter) % len(data)]

                def decode(data: VideoDataset = data, counter: itertools.count = counter) -> None:
                    i = next(counter)
                    video = open_video(Path(tmp) / data.samples[i % len(data)].path, data.decoder)
                    video.frames(
                        sampling.tsn_train_indices(video.num_frames, frames, sampling.sample_rng(0, 0, i))
                    )
                    video.close()

                cases.append(harness.Case(f"{codec} {decoder} decode+augment", clip))
                cases.append(harness.Case(f"{codec} {decoder} decode", decode))
        results = harness.run_interleaved(cases, args.repeats, args.warmup, device)
    harness.report("one training clip (ms)", results)
    print()
    for name, res in results.items():
        print(f"rate {name}: {1 / res.median:.1f} clips/s (median {res.median * 1e3:.1f} ms)")
    if args.step_tower != "none":
        tower = TowerConfig(8, 32, 2, 2, 16, img_size=size) if args.quick else tower_config(args.step_tower)
        step = training_step(tower, frames, size, device)
        timed = harness.run_interleaved([step], 1 if args.quick else args.step_repeats, 1, device)
        step_time = timed[step.name].median
        print(
            f"rate {step.name}: {1 / step_time:.4f} clips/s (median {step_time:.1f} s per clip; torch "
            f"threads {torch.get_num_threads()})"
        )
        rates = {"this CPU": 1 / step_time} | ({"--step-rate": args.step_rate} if args.step_rate else {})
        for name, res in results.items():
            if name.endswith("decode+augment"):
                worker = 1 / res.median
                for where, rate in rates.items():
                    print(
                        f"ratio loader/step {name} vs the step on {where}: {worker / rate:.1f} (one worker "
                        f"{worker:.1f} clips/s, step {rate:.4g} clips/s): {math.ceil(rate / worker)} loader "
                        "worker(s) needed"
                    )
    if "decord" in decoders and "pyav" in decoders:
        for codec in CODECS:
            for stage in ("decode+augment", "decode"):
                harness.ratio(
                    f"{codec} {stage} decord / pyav time",
                    results[f"{codec} decord {stage}"],
                    results[f"{codec} pyav {stage}"],
                )
    harness.finish()


def training_step(tower: TowerConfig, frames: int, size: int, device: torch.device) -> harness.Case:
    """VidPrism's training step on one clip: forward, the released loss, backward, AdamW."""
    classes = 400
    model = VidPrism(tower, HeadConfig(dim=tower.output_dim, num_classes=classes), img_size=size)
    model.backbone.set_grad_checkpointing(True)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.param_groups(1e-4, 0.07), lr=1e-4, weight_decay=0.2)
    clips = torch.randn(1, frames, 3, size, size, device=device)
    labels = torch.zeros(1, dtype=torch.long, device=device)
    class_text = F.normalize(torch.randn(classes, tower.output_dim, device=device), dim=-1)

    def run() -> None:
        released_loss(model(clips), labels, class_text).total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    millions = sum(p.numel() for p in model.parameters()) / 1e6
    return harness.Case(f"training step ({millions:.1f}M parameters, 1 clip of {frames}x{size}²)", run)


if __name__ == "__main__":
    main()

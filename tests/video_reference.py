"""The VidPrism head computed the way the released code computes it: the oracle the fast head must match.

It reads the weights of a :class:`~prism_vfm.video.VidPrismHead` and runs the released order of
operations: RgSTA window by window and sample by sample (the frame projection computed twice per
window, a top-1 and a gather per sample), DBI pair by pair with every passing update computed (each
reading the pre-DBI streams and, in the released mode, replacing its target), the experts and the
read-out on sequence-first tensors through ``F.multi_head_attention_forward``, and the losses written out
as the training script writes them. Written for clarity and fidelity, not speed; the benchmark
``benchmarks/bench_vidprism_head.py`` times it against the head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prism_vfm.video import VidPrismHead
from prism_vfm.video.dbi import pair_key


def _mha(attn: nn.MultiheadAttention, q: Tensor, kv: Tensor, training: bool) -> tuple[Tensor, Tensor | None]:
    """Sequence-first (L, B, D) multi-head attention with the module's weights, weights averaged."""
    return F.multi_head_attention_forward(
        q,
        kv,
        kv,
        attn.embed_dim,
        attn.num_heads,
        attn.in_proj_weight,
        attn.in_proj_bias,
        None,
        None,
        False,
        0.0,
        attn.out_proj.weight,
        attn.out_proj.bias,
        training=training,
        need_weights=True,
        average_attn_weights=True,
    )


def _rgsta(module: nn.Module, x: Tensor, training: bool) -> tuple[Tensor, Tensor, Tensor]:
    """x (B, D, T) → tokens (B, D, L), kept positions (B, L), rank loss ()."""
    batch, _, frames = x.shape
    tokens, kept, losses = [], [], []
    for start in range(0, frames, module.rate):
        chunk = x[:, :, start : min(start + module.rate, frames)]
        width = chunk.shape[-1]
        if width <= 1:
            tokens.append(chunk)
            kept.append(torch.zeros(batch, 1, dtype=torch.long))
            continue
        unit = F.normalize(module.metric_proj(chunk.permute(0, 2, 1)), dim=-1)
        sim = torch.bmm(unit, unit.transpose(1, 2))
        sim = sim.masked_fill(torch.eye(width, dtype=torch.bool, device=x.device).unsqueeze(0), 0)
        s_pred = module.score(module.score_norm(module.metric_proj(chunk.permute(0, 2, 1)))).squeeze(-1)
        if training:
            target = (chunk.norm(dim=1) + sim.mean(dim=1)).detach()
            p_pred = F.softmax(s_pred / module.score_temp, dim=-1)
            p_tgt = F.softmax(target / module.score_temp, dim=-1)
            kl = (p_tgt * (p_tgt.clamp_min(1e-9).log() - p_pred.clamp_min(1e-9).log())).sum(dim=-1)
            losses.append(kl.mean())
        s_mix = module.alpha * s_pred + (1 - module.alpha) * chunk.norm(dim=1)
        attn = F.softmax(sim / module.tau, dim=-1)
        merged, kept_w = [], []
        for b in range(batch):
            top = s_mix[b].topk(1).indices
            rest_mask = torch.ones(width, dtype=torch.bool, device=x.device)
            rest_mask[top] = False
            rest = rest_mask.nonzero().squeeze(-1)
            weight = attn[b][rest][:, top]
            weight = weight / (weight.sum(dim=1, keepdim=True) + 1e-6)
            add = torch.mm(weight.t(), chunk[b][:, rest].t()).t()
            merged.append((chunk[b][:, top] + add / 2.0).unsqueeze(0))
            kept_w.append(top)
        tokens.append(torch.cat(merged, dim=0))
        kept.append(torch.stack(kept_w).cpu())
    rank = torch.stack(losses).mean() if losses else x.new_tensor(0.0)
    return torch.cat(tokens, dim=-1), torch.cat(kept, dim=1), rank


def _dbi(dbi: nn.Module, feats: list[Tensor], update: str) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
    """Streams (B, D, L_i) → exchanged streams, pair scores (N, N, B), pass flags, last writers."""
    n = len(feats)
    batch = feats[0].shape[0]
    outputs = list(feats)
    summaries = [f.mean(dim=2) for f in feats]
    scores = torch.zeros(n, n, batch)
    passed = torch.zeros(n, n, dtype=torch.long)
    writer = torch.full((n,), -1, dtype=torch.long)
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            score = dbi.score_mlps[i * n + j](torch.cat([summaries[i], summaries[j]], dim=-1)).squeeze(-1)
            scores[i, j] = score.detach().cpu()
            if score.mean().item() < dbi.threshold:
                continue
            passed[i, j] = 1
            if dbi.slow[i] and not dbi.slow[j]:
                up = F.interpolate(feats[i], size=feats[j].shape[2], mode="linear", align_corners=False)
                add = score.view(-1, 1, 1) * dbi.slow_to_fast(up)
            elif not dbi.slow[i] and dbi.slow[j]:
                add = score.view(-1, 1, 1) * dbi.fast_to_slow[pair_key(i, j)](feats[i])
            else:
                continue
            outputs[j] = (feats[j] if update == "last" else outputs[j]) + add
            writer[j] = i
    return outputs, scores, passed, writer


def _expert(expert: nn.Module, x: Tensor, training: bool) -> Tensor:
    """x (L, B, D), post-LN layer with a QuickGELU FFN."""
    x = expert.norm1(x + _mha(expert.attn, x, x, training)[0])
    hidden = expert.ffn[0](x)
    return expert.norm2(x + expert.ffn[2](hidden * torch.sigmoid(1.702 * hidden)))


def _diversity(summaries: Tensor, form: str) -> Tensor:
    batch, n, _ = summaries.shape
    if form == "inter_expert":
        unit = F.normalize(summaries, p=2, dim=-1)
        sim = torch.bmm(unit, unit.transpose(1, 2))
        mask = 1 - torch.eye(n, device=summaries.device).unsqueeze(0)
        return ((sim * mask) ** 2).sum() / (batch * n * (n - 1))
    if batch <= 1:
        return summaries.new_zeros(())
    total, pairs = summaries.new_zeros(()), 0
    for a in range(batch):
        for b in range(a + 1, batch):
            total = total + (1.0 - F.cosine_similarity(summaries[a], summaries[b], dim=-1).mean())
            pairs += 1
    return total / pairs


def reference_forward(
    head: VidPrismHead, features: Tensor, class_text: Tensor | None = None
) -> dict[str, Tensor]:
    """Every head quantity under the fixture names (streams batch-first (B, L, D))."""
    cfg = head.cfg
    training = head.training
    x = features.permute(0, 2, 1)  # (B, D, T)
    out: dict[str, Tensor] = {}
    streams, ranks = [], []
    for r, module in enumerate(head.rgsta):
        tokens, kept, rank = _rgsta(module, x, training)
        streams.append(tokens)
        ranks.append(rank)
        out[f"rgsta.{r}.out"], out[f"rgsta.{r}.kept_index"], out[f"rgsta.{r}.L_rank"] = (
            tokens.permute(0, 2, 1),
            kept,
            rank,
        )
    out["L_rank"] = torch.stack(ranks).mean()
    if cfg.dbi:
        streams, out["dbi.pair_scores"], out["dbi.pair_passed"], out["dbi.last_writer"] = _dbi(
            head.dbi, streams, cfg.dbi_update
        )
    seqs = [s.permute(2, 0, 1) for s in streams]  # (L, B, D)
    expert_out = []
    for e, (expert, seq) in enumerate(zip(head.experts, seqs, strict=True)):
        out[f"dbi.{e}.out"] = seq.permute(1, 0, 2)
        y = _expert(expert, seq, training)
        expert_out.append(y)
        out[f"expert.{e}.out"] = y.permute(1, 0, 2)
    readout = head.readout
    batch = features.shape[0]
    pooled, attn = _mha(
        readout.attn, readout.query.expand(1, batch, cfg.dim), torch.cat(expert_out), training
    )
    assert attn is not None
    out["f"] = readout.norm(pooled.squeeze(0))
    out["readout_attn"] = attn = attn.squeeze(1)
    gates, start = [], 0
    for y in expert_out:
        gates.append(attn[:, start : start + y.shape[0]].sum(dim=1))
        start += y.shape[0]
    out["gating_weights"] = torch.stack(gates, dim=1)
    out["E_bnd"] = torch.stack([y.mean(dim=0) for y in expert_out], dim=0).permute(1, 0, 2).contiguous()
    out["L_div"] = _diversity(out["E_bnd"], cfg.diversity)
    if head.projection is not None:
        out["z"] = head.projection(out["f"])
    if cfg.variant == "text":
        assert class_text is not None
        out["logits"] = F.normalize(out["z"], dim=-1) @ F.normalize(class_text, dim=-1).t()
    else:
        out["logits"] = head.classifier(out["f"])
    return out


def reference_loss(
    out: dict[str, Tensor], labels: Tensor, class_text: Tensor | None = None
) -> dict[str, Tensor]:
    """The training script's loss lines on :func:`reference_forward`'s output."""
    gating = out["gating_weights"]
    batch, n = gating.shape
    terms = {
        "L_ce": F.cross_entropy(out["logits"], labels),
        "L_gate": n * (gating.mean(0) * (gating.sum(0) / batch)).sum(),
    }
    loss = terms["L_ce"] + 0.01 * terms["L_gate"]
    if class_text is not None:
        per_video = F.normalize(out["z"], dim=1) @ F.normalize(class_text, dim=1).t()
        terms["L_con"] = F.cross_entropy(per_video, labels)
        loss = loss + 0.01 * terms["L_con"]
    terms["L_div"], terms["L_rank"] = out["L_div"], out["L_rank"]
    terms["loss"] = loss + 0.005 * out["L_div"] + 0.1 * out["L_rank"]
    return terms

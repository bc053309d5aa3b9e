"""AttnLRP on language models: export, generation rows, token ids (issues 16.4, 17.1, 17.3)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import attrax as ax

transformers = pytest.importorskip("transformers")

LOADER = r"""
import sys
sys.modules["attrax"] = None  # the exported program must not need attrax
import torch
prog = torch.export.load(sys.argv[1]).module()
calls = torch.load(sys.argv[2], weights_only=True)
print(max(float((prog(*args) - ref).abs().max()) for args, ref in calls))
"""


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=40, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_attn_lrp_on_gpt2_exports_and_runs_without_attrax(tmp_path) -> None:
    f, p = ax.functionalize(gpt2(), output=lambda out: out.logits[:, -1], embedding="transformer.wte")
    g = torch.Generator().manual_seed(1)
    x = f.embed(p, torch.randint(0, 40, (3, 7), generator=g))
    comp = ax.composites.attn_lrp()
    prog = ax.export(ax.lrp, f, p, x, torch.full((3,), 4), composite=comp)
    torch.export.save(prog, tmp_path / "attn_lrp.pt2")
    calls = []
    for batch in (2, 5):
        xb = f.embed(p, torch.randint(0, 40, (batch, 7), generator=g))
        tb = torch.randint(0, 40, (batch,), generator=g)
        calls.append(((xb, tb), ax.lrp(f, p, xb, tb, composite=comp)))
    torch.save(calls, tmp_path / "calls.pt")
    (tmp_path / "load.py").write_text(LOADER)
    r = subprocess.run([sys.executable, str(tmp_path / "load.py"), str(tmp_path / "attn_lrp.pt2"),
                        str(tmp_path / "calls.pt")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.strip().splitlines()[-1]) < 1e-5


def test_attn_lrp_from_token_ids_and_generation_rows() -> None:
    model = gpt2().double()
    f, p = ax.functionalize(model, output="logits", embedding="transformer.wte")
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(2))
    e = f.embed(p, ids)
    comp = ax.composites.attn_lrp()

    class ByHand(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, emb):
            return self.model(inputs_embeds=emb).logits

    hand_f, hand_p = ax.functionalize(ByHand())
    target = ax.targets.next_token(torch.tensor([3, 5]))
    torch.testing.assert_close(ax.lrp(f, p, e, target, composite=comp), ax.lrp(hand_f, hand_p, e, target, composite=comp),
                               rtol=1e-6, atol=1e-12)
    start = 5
    matrix = ax.lm.generation(ax.lrp, f, p, e, ids[:, start:], start=start, composite=comp)
    for k in range(ids.shape[1] - start):
        row = ax.lrp(f, p, e, ax.targets.next_token(ids[:, start + k], start + k - 1), composite=comp).sum(-1)
        torch.testing.assert_close(matrix[:, k], row, rtol=1e-6, atol=1e-12)

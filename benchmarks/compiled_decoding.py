"""Does ``torch.compile`` make a greedy decoding step faster on this CPU?

    .venv/bin/python benchmarks/compiled_decoding.py --compile none
    .venv/bin/python benchmarks/compiled_decoding.py --compile max-autotune
    .venv/bin/python benchmarks/compiled_decoding.py --matmuls --compile none
    .venv/bin/python benchmarks/compiled_decoding.py --matmuls --compile max-autotune

The step: the embedded model in bfloat16 decodes greedily the 16 prompts of ``grouppo bench
--generation`` (batch 16, up to 192 new tokens) over transformers' ``StaticCache``, one forward pass
per token, the prompts encoded first without compiling. With ``--compile`` the step function is
compiled whole (``fullgraph``, static shapes) with inductor's weight freezing on, which prepacks the
weights; ``max-autotune`` also lets inductor choose, per matrix product, between oneDNN and its own
AMX/AVX-512 GEMM template. Prints the compile time (the first step), the mean time of the later steps,
and, compiled, how many tokens agree with the eager run's (saved in ``--out``).

``--matmuls``: only one step's matrix products of the same shapes (30 layers of q, k, v, o, gate, up
and down projections at 16 rows, bfloat16, random weights), to see what compiling does to them alone.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from grouppo.apps.bench.generation import bench_prompt_ids
from grouppo.generation import left_padded
from grouppo.models import load_model, load_tokenizer, resolve_model


def _compiled(fn, mode: str):
    if mode == "none":
        return fn
    import torch._inductor.config as inductor

    inductor.freezing = True
    return torch.compile(fn, mode=None if mode == "default" else mode, fullgraph=True, dynamic=False)


class Products(torch.nn.Module):
    """A decoding step's matrix products for a SmolLM2-135M-shaped model, with residual adds between."""

    def __init__(self, layers: int = 30, hidden: int = 576, kv: int = 192, inner: int = 1536) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList()
        for _ in range(layers):
            shapes = {"q": (hidden, hidden), "k": (hidden, kv), "v": (hidden, kv), "o": (hidden, hidden),
                      "gate": (hidden, inner), "up": (hidden, inner), "down": (inner, hidden)}  # fmt: skip
            layer = torch.nn.ModuleDict({k: torch.nn.Linear(*s, bias=False) for k, s in shapes.items()})
            self.layers.append(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        repeat = x.shape[-1] // self.layers[0]["k"].out_features
        for p in self.layers:
            x = x + p["o"](p["q"](x) + p["k"](x).repeat(1, repeat) * p["v"](x).repeat(1, repeat))
            x = x + p["down"](F.silu(p["gate"](x)) * p["up"](x))
        return x


def matmuls(mode: str, rows: int = 16, steps: int = 50) -> None:
    torch.manual_seed(0)
    model = Products().to(torch.bfloat16).eval()
    x = torch.randn(rows, 576, dtype=torch.bfloat16)
    with torch.no_grad():
        start = time.perf_counter()
        fn = _compiled(model, mode)
        fn(x)
        print(f"first call {time.perf_counter() - start:.1f} s")
        for _ in range(5):
            fn(x)
        start = time.perf_counter()
        for _ in range(steps):
            fn(x)
    print(f"matrix products, compile {mode}: {(time.perf_counter() - start) / steps * 1e3:.2f} ms a step")


def decode(mode: str, out: Path, prompts: int = 16, new_tokens: int = 192) -> None:
    from transformers import StaticCache

    name = resolve_model(None)
    model, tokenizer = load_model(name, dtype=torch.bfloat16).eval(), load_tokenizer(name)
    ids, mask = left_padded(bench_prompt_ids(tokenizer, prompts), tokenizer.pad_token_id)
    batch, length = ids.shape
    cache = StaticCache(config=model.config, max_cache_len=length + new_tokens)
    # Future positions hold no keys yet; the causal mask built from cache_position hides them.
    full_mask = torch.cat([mask, mask.new_ones(batch, new_tokens)], 1)

    def step(tokens: torch.Tensor, positions: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=tokens, attention_mask=full_mask, position_ids=positions,
                       past_key_values=cache, cache_position=cache_position, use_cache=True).logits
        return logits[:, -1].argmax(-1)

    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=torch.cat([mask, mask.new_zeros(batch, new_tokens)], 1),
                       position_ids=positions, past_key_values=cache, cache_position=torch.arange(length),
                       use_cache=True).logits  # fmt: skip
        token = logits[:, -1].argmax(-1)
        fn = _compiled(step, mode)
        tokens, times = [token], []
        for i in range(new_tokens - 1):
            start = time.perf_counter()
            token = fn(token[:, None], (positions[:, -1] + 1 + i)[:, None], torch.tensor([length + i]))
            times.append(time.perf_counter() - start)
            tokens.append(token)
    later = times[10:]
    print(f"first step {times[0]:.1f} s; compile {mode}: {sum(later) / len(later) * 1e3:.1f} ms a step "
          f"(mean of steps 11 to {len(times)}, batch {batch})")  # fmt: skip
    made = torch.stack(tokens, 1)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(made, out / f"tokens_{mode}.pt")
    eager = out / "tokens_none.pt"
    if mode != "none" and eager.exists():
        same = made == torch.load(eager)
        print(f"tokens equal to the eager run's: {same.float().mean():.0%}; whole answers equal: "
              f"{int(same.all(1).sum())} of {batch}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--compile", default="none", choices=["none", "default", "max-autotune"])
    parser.add_argument("--matmuls", action="store_true", help="Only one step's matrix products.")
    parser.add_argument("--out", default="runs/compiled_decoding", help="Where each run's tokens are saved.")
    args = parser.parse_args()
    if args.matmuls:
        matmuls(args.compile)
    else:
        decode(args.compile, Path(args.out))


if __name__ == "__main__":
    main()

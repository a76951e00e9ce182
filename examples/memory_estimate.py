"""GPU memory per GPU for GroupDPO under DDP, ZeRO-2, ZeRO-3 and FSDP2: computed, not measured.

    python examples/memory_estimate.py            # the tables of docs/distributed.md, in Markdown
    python examples/memory_estimate.py --gpus 16  # the same for 2 nodes of 8 GPUs

Plain Python (no torch). Every number is a formula over the model's shape; nothing here was run on a
GPU. The formulas, their assumptions and what they leave out are printed with the tables.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GIB = 2**30
CONTEXT_GIB = 2  # CUDA context and the allocator's reserve, per GPU (typically 1 to 3 GiB)
# Memory a GPU reports (torch.cuda.mem_get_info's total): H100 80 GB, H200 141 GB.
GPU_SIZES = (("80 GB", 79.6), ("141 GB", 140.4))


@dataclass(frozen=True)
class Model:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool  # input embeddings and LM head share one matrix
    qkv_bias: bool

    @property
    def kv_hidden(self) -> int:
        """Width of the keys (and of the values): kv_heads x head_dim."""
        return self.kv_heads * (self.hidden // self.heads)

    @property
    def layer_params(self) -> int:
        h, kv, i = self.hidden, self.kv_hidden, self.intermediate
        attention = 2 * h * h + 2 * h * kv + ((h + 2 * kv) if self.qkv_bias else 0)  # q, o; k, v; biases
        return attention + 3 * h * i + 2 * h  # gate, up, down; two RMSNorms

    @property
    def head_params(self) -> int:
        """The LM head's matrix (the embedding matrix itself when tied)."""
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        embeddings = self.vocab * self.hidden
        head = 0 if self.tied else self.head_params
        return self.layers * self.layer_params + embeddings + head + self.hidden  # + final norm


# Shapes from the models' config.json files on the Hugging Face Hub.
MODELS = [
    Model("Qwen2.5-1.5B", 28, 1536, 8960, 12, 2, 151936, tied=True, qkv_bias=True),
    Model("Llama-2-7B", 32, 4096, 11008, 32, 32, 32000, tied=False, qkv_bias=False),
    Model("Qwen2.5-7B", 28, 3584, 18944, 28, 4, 152064, tied=False, qkv_bias=True),
    Model("Llama-3-70B", 80, 8192, 28672, 64, 8, 128256, tied=False, qkv_bias=False),
]


@dataclass(frozen=True)
class Engine:
    """Bytes per parameter on each GPU: (bytes, sharded over the GPUs?) for each kind of state."""

    name: str
    weights: tuple[float, bool]  # bf16 working copy
    master: tuple[float, bool]  # fp32 master weights
    grads: tuple[float, bool]
    adam: tuple[float, bool]  # fp32 exp_avg + exp_avg_sq
    gathers: bool  # whole layers are all-gathered while they run (ZeRO-3, FSDP)
    note: str


ENGINES = [
    Engine("DDP", (2, False), (4, False), (8, False), (8, False), False,
           "the fp32 parameters are the master copy; bf16 = autocast's casts of them, alive from forward to "
           "backward; grads = fp32 .grad 4 + DDP's bucket copy 4 (gradient_as_bucket_view is off)"),
    Engine("ZeRO-2", (2, False), (4, True), (2, True), (8, True), False,
           "the bf16 model on every GPU; fp32 master, Adam and the bf16 gradient partition sharded"),
    Engine("ZeRO-3", (2, True), (4, True), (2, True), (8, True), True,
           "bf16 parameters, bf16 gradients, fp32 master and Adam: all sharded"),
    Engine("FSDP2", (0, True), (4, True), (4, True), (8, True), True,
           "the sharded parameters are fp32 (accelerate upcasts them: the master copy); fp32 sharded "
           "grads; bf16 copies exist only for gathered units"),
]  # fmt: skip


@dataclass(frozen=True)
class Workload:
    gpus: int
    group_size: int  # K responses a prompt
    response_tokens: int  # s
    prompt_tokens: int  # P
    response_chunk_size: int  # C
    logits_chunk_size: int  # T


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def states(model: Model, engine: Engine, gpus: int) -> dict[str, float]:
    """Bytes per GPU of each kind of model state, and of the units held whole while they run."""
    out = {}
    for kind in ("weights", "master", "grads", "adam"):
        per_param, sharded = getattr(engine, kind)
        out[kind] = per_param * model.params / (gpus if sharded else 1)
    out["gathered"] = gathered(model, engine)
    out["total"] = sum(out.values())
    return out


def root_params(model: Model) -> int:
    """FSDP2's root unit under accelerate's TRANSFORMER_BASED_WRAP: what is not in a decoder layer (the
    embedding, the LM head when untied, the final norm)."""
    return model.vocab * model.hidden * (1 if model.tied else 2) + model.hidden


def gathered(model: Model, engine: Engine) -> float:
    """Bytes of parameters and gradients held whole (unsharded) at the peak, beyond the shards.

    FSDP2: the root unit is gathered in bf16 for the whole step (the root does not reshard after its
    forward) and its gradient is produced whole, in float32, before its reduce-scatter at the end of the
    backward; plus 2 decoder layers gathered in bf16 (the one running and the one prefetched) and one
    layer's whole float32 gradient. ZeRO-3: the LM head gathered in bf16 (it runs once per token chunk,
    forward and backward), 2 decoder layers in bf16, and the largest unit's whole bf16 gradient before
    its reduce-scatter."""
    layer = model.layer_params
    if engine.name == "FSDP2":
        return 2 * root_params(model) + 4 * root_params(model) + 2 * 2 * layer + 4 * layer
    if engine.name == "ZeRO-3":
        return 2 * model.head_params + 2 * 2 * layer + 2 * max(model.head_params, layer)
    return 0.0


def korthikanti(model: Model, tokens: int) -> float:
    """Bytes of activations one decoder layer stores for `tokens` tokens: 34 s h (bf16, no recomputation;
    the 5 a s^2 attention-score term is left out because SDPA / FlashAttention does not store scores)."""
    return 34 * tokens * model.hidden


def llama_block(model: Model, tokens: int) -> float:
    """The same, counted for a Llama/Qwen block (RMSNorm, rotary, SDPA, SwiGLU, no dropout), bf16:
    22 s h + 4 s h_kv + 8 s i (two norms with their fp32 input 16 s h; q and attention output and o_proj
    input 6 s h; k, v 4 s h_kv; SwiGLU's gate, silu, up and product 8 s i)."""
    s, h = tokens, model.hidden
    return 22 * s * h + 4 * s * model.kv_hidden + 8 * s * model.intermediate


def activations(model: Model, w: Workload, per_layer) -> dict[str, float]:
    """Bytes of activations per GPU for one group (per_device_train_batch_size 1)."""
    L, s = model.layers, w.response_tokens
    prompt = L * per_layer(model, w.prompt_tokens)  # the prompt runs once per group, in every mode
    final_hidden = 2 * w.group_size * s * model.hidden  # LM-head input of all K responses, bf16
    coupled = w.group_size * L * per_layer(model, s)
    decoupled = w.response_chunk_size * L * per_layer(model, s)
    # Per-layer activation checkpointing: each layer keeps its bf16 input; one layer's activations are
    # rebuilt at a time. The prompt keeps its layer inputs and its KV cache (shared by the responses).
    checkpointed = w.response_chunk_size * (L * 2 * s * model.hidden + per_layer(model, s))
    prompt_checkpointed = L * (2 * w.prompt_tokens * model.hidden + 4 * w.prompt_tokens * model.kv_hidden)
    return {
        "coupled": coupled + prompt + final_hidden,
        "decoupled": decoupled + prompt + final_hidden,
        "checkpointed": checkpointed + prompt_checkpointed + final_hidden,
        "per_response": L * per_layer(model, s),
        "prompt": prompt,
        "final_hidden": final_hidden,
    }


def logits(model: Model, tokens: int) -> float:
    """One float32 [tokens, vocab] tensor."""
    return 4 * tokens * model.vocab


def report(w: Workload) -> str:
    K, s, P, C, T, N = (w.group_size, w.response_tokens, w.prompt_tokens, w.response_chunk_size,
                        w.logits_chunk_size, w.gpus)  # fmt: skip
    lines = []
    add = lines.append

    add(f"Workload: {N} GPUs, one group per GPU (per_device_train_batch_size 1), K = {K} responses of "
        f"s = {s} tokens, a prompt of P = {P} tokens, response_chunk_size C = {C}, logits_chunk_size "
        f"T = {T}. GiB = 2^30 bytes. Every number below is computed, not measured.")  # fmt: skip
    add("")
    add("**Model shapes** (from each model's config.json; parameters counted from the shapes)")
    add("")
    add(
        "| model | layers L | hidden h | intermediate i | heads / kv heads | vocab V | tied head "
        "| parameters |"
    )
    add("|---|---:|---:|---:|---:|---:|---|---:|")
    for m in MODELS:
        add(f"| {m.name} | {m.layers} | {m.hidden} | {m.intermediate} | {m.heads} / {m.kv_heads} | "
            f"{m.vocab} | {'yes' if m.tied else 'no'} | {m.params / 1e9:.2f} B |")  # fmt: skip
    add("")

    add(f"**Model states per GPU, GiB** (computed, not measured). Bytes per parameter Ψ, with /{N} where "
        "the engine shards that state over the GPUs:")  # fmt: skip
    add("")
    for e in ENGINES:
        terms = []
        for kind, label in (("weights", "bf16 weights"), ("master", "fp32 master"), ("grads", "grads"),
                            ("adam", "Adam m, v")):  # fmt: skip
            b, sharded = getattr(e, kind)
            if b:
                terms.append(f"{label} {b:g}Ψ{f'/{N}' if sharded else ''}")
        gathered = " + gathered bf16 units" if e.gathers else ""
        add(f"- {e.name}: {' + '.join(terms)}{gathered}. {e.note[0].upper()}{e.note[1:]}.")
    add(
        "- Held whole (ZeRO-3, FSDP2), beyond the shards. FSDP2: the root unit R (embedding, untied LM head, "
        "final norm) gathered in bf16 for the whole step, 2·R, and its whole fp32 gradient before the "
        "reduce-scatter, 4·R; 2 decoder layers gathered in bf16 (running and prefetched), 4·layer; one "
        "layer's whole fp32 gradient, 4·layer. ZeRO-3: the bf16 LM head, 2·V·h (it runs once per token "
        "chunk); 2 bf16 decoder layers, 4·layer; the largest unit's whole bf16 gradient, "
        "2·max(V·h, layer)."
    )
    add("")
    add("| model | engine | bf16 weights | fp32 master | grads | Adam | gathered | total |")
    add("|---|---|---:|---:|---:|---:|---:|---:|")
    for m in MODELS:
        for e in ENGINES:
            st = states(m, e, N)
            add(f"| {m.name} | {e.name} | " + " | ".join(gib(st[k]) for k in
                ("weights", "master", "grads", "adam", "gathered", "total")) + " |")  # fmt: skip
    add("")

    add(
        "**The reference, per GPU, GiB** (computed, not measured). A frozen copy (or a reference model "
        "given by path) is held as the engine holds the policy: a replica on every GPU under DDP and ZeRO-2 "
        f"(bf16 2Ψ, or fp32 4Ψ when the policy is loaded in float32, as examples/groupdpo_7b.yaml does), "
        f"sharded under ZeRO-3 and FSDP2 (2Ψ/{N} or 4Ψ/{N}; its layers are gathered as it runs, between the "
        "policy's passes, within the gathered budget above). Precomputed: 0 on the GPU during training (one "
        "float per response, on disk and in the dataset; under ZeRO-3 and FSDP2 a temporary sharded copy "
        "computes them before training). PEFT: the adapter-disabled policy, 0 extra."
    )
    add("")
    add("| model | frozen copy, bf16: DDP, ZeRO-2 | bf16: ZeRO-3, FSDP2 | fp32: DDP, ZeRO-2 | "
        "fp32: ZeRO-3, FSDP2 | precompute_ref_logps | PEFT base |")  # fmt: skip
    add("|---|---:|---:|---:|---:|---:|---:|")
    for m in MODELS:
        add(f"| {m.name} | {gib(2 * m.params)} | {gib(2 * m.params / N)} | {gib(4 * m.params)} | "
            f"{gib(4 * m.params / N)} | 0 | 0 |")  # fmt: skip
    add("")

    add("**Activations of one group per GPU, GiB** (computed, not measured; bf16). Per decoder layer "
        "and sequence of s tokens, two counts: (a) 34·s·h bytes, Korthikanti et al. 2022 "
        "(\"Reducing Activation Recomputation in Large Transformer Models\", eq. 1) without its 5·a·s² "
        "attention-score term, which SDPA/FlashAttention does not store; (b) 22·s·h + 4·s·h_kv + 8·s·i "
        "bytes, counted for a Llama/Qwen block (two RMSNorms with their fp32 inputs 16·s·h; q, attention "
        "output and o_proj input 6·s·h; k, v 4·s·h_kv; SwiGLU 8·s·i; no dropout). "
        "Coupled: K·L·a(s) + prompt + final hidden. Decoupled: C·L·a(s) + prompt + final hidden "
        "(one chunk of C responses alive; the single backward recomputes and frees one chunk at a "
        "time). Decoupled + per-layer checkpointing (fsdp2_ac.yaml): C·(L·2·s·h + a(s)) + "
        "L·(2·P·h + 4·P·h_kv) + final hidden. Prompt: L·a(P), stored once per group in every mode. "
        "Final hidden: the LM-head input of all K responses, 2·K·s·h.")  # fmt: skip
    add("")
    add(
        f"| model | count | one response, all layers | prompt (P={P}) | final hidden (K={K}) | "
        f"coupled, K={K} | decoupled, C={C} | decoupled, C={C}, + per-layer checkpointing |"
    )
    add("|---|---|---:|---:|---:|---:|---:|---:|")
    for m in MODELS:
        for label, per_layer in (("(a) 34sh", korthikanti), ("(b) Llama block", llama_block)):
            a = activations(m, w, per_layer)
            add(f"| {m.name} | {label} | {gib(a['per_response'])} | {gib(a['prompt'])} | "
                f"{gib(a['final_hidden'])} | {gib(a['coupled'])} | {gib(a['decoupled'])} | "
                f"{gib(a['checkpointed'])} |")  # fmt: skip
    add("")

    add(f"**LM-head logits, GiB** (computed, not measured): one float32 [tokens, V] tensor, 4·tokens·V "
        f"bytes. grouppo projects T = {T} tokens at a time (each token chunk under its own checkpoint); "
        f"projecting all K·s = {K * s} response tokens at once makes the whole tensor. The backward of a "
        f"chunk holds about two such tensors (the logits and their gradient).")  # fmt: skip
    add("")
    add(f"| model | V | T = {T} tokens | all {K * s} tokens |")
    add("|---|---:|---:|---:|")
    for m in MODELS:
        add(f"| {m.name} | {m.vocab} | {gib(logits(m, T))} | {gib(logits(m, K * s))} |")
    add("")

    add(f"**Total per GPU, GiB** (computed, not measured): model states (with what is held whole) + "
        f"reference + activations by the Llama-block count (b) + one logits tensor + {CONTEXT_GIB} GiB "
        f"of CUDA context and allocator reserve. Naive: a frozen bf16 reference copy, coupled K = {K}, "
        f"logits of all {K * s} tokens. grouppo: precompute_ref_logps, decoupled C = {C}, T = {T}. "
        "grouppo + AC: the same with per-layer activation checkpointing (fsdp2_ac.yaml). Then whether "
        "grouppo + AC fits a GPU: fits below 90% of its memory (room for fragmentation), tight from 90% "
        "to 100%, else does not fit.")  # fmt: skip
    add("")
    sizes = " | ".join(f"{name} ({cap:.1f} GiB)" for name, cap in GPU_SIZES)
    add(f"| model | engine | naive | grouppo | grouppo + AC | {sizes} |")
    add("|---|---|---:|---:|---:|" + "---|" * len(GPU_SIZES))
    for m in MODELS:
        a = activations(m, w, llama_block)
        context = CONTEXT_GIB * GIB
        for e in ENGINES:
            st = states(m, e, N)["total"]
            naive = st + 2 * m.params + a["coupled"] + logits(m, K * s) + context
            ours = st + a["decoupled"] + logits(m, T) + context
            ac = st + a["checkpointed"] + logits(m, T) + context
            fits = " | ".join(fit(ac, cap) for _, cap in GPU_SIZES)
            add(f"| {m.name} | {e.name} | {gib(naive)} | {gib(ours)} | {gib(ac)} | {fits} |")
    add("")
    add(
        "Not counted: NCCL buffers, ZeRO's reduce/prefetch buckets beyond one unit, each response's copy of "
        "the prompt's keys and values in attention, and autocast's fp32 residual stream under DDP with a "
        "float32 model (the activation counts assume bf16 tensors throughout)."
    )
    return "\n".join(lines)


def fit(total: float, capacity_gib: float) -> str:
    """Whether ``total`` bytes fit a GPU of ``capacity_gib``: below 90%, up to 100%, or not."""
    share = total / (capacity_gib * GIB)
    return "fits" if share < 0.9 else "tight" if share <= 1.0 else "does not fit"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8, help="GPUs in all (the sharding degree)")
    parser.add_argument("--group_size", type=int, default=8, help="K, responses per prompt")
    parser.add_argument("--response_tokens", type=int, default=1024, help="s, tokens per response")
    parser.add_argument("--prompt_tokens", type=int, default=512, help="P, tokens per prompt")
    parser.add_argument("--response_chunk_size", type=int, default=2, help="C, responses per chunk")
    parser.add_argument("--logits_chunk_size", type=int, default=512, help="T, LM-head tokens per chunk")
    args = parser.parse_args(argv)
    print(report(Workload(args.gpus, args.group_size, args.response_tokens, args.prompt_tokens,
                          args.response_chunk_size, args.logits_chunk_size)))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

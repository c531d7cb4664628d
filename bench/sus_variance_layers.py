"""Where SUS gradient variance comes from: SUS in one layer at a time and in all layers, per parameter group.

    python bench/sus_variance_layers.py   # SmolLM2-135M, n = 512, c = 30, MATH + vim's options.txt: ~1 h on 1 core
    python bench/sus_variance_layers.py --windows 4 --layer-windows 1 --length 128 --texts long   # a quick look

Definitions (bench/sus_variance.py has the all-layer one). For a window x of n tokens, g(x) is the exact
gradient of the mean next-token NLL; g~_l(x) the gradient with a SUS attention backward (fresh mask)
in layer l only, g~(x) with SUS in every layer. Per parameter group G (a slice of the parameters):

    V_mb[G]      = E_x ||g_G(x) - E g_G||^2                 (windows drawn from the text, batch of 1 window)
    V_sus,l[G]   = E_x E_mask ||g~_l,G(x) - g_G(x)||^2      (SUS in layer l only)
    V_sus,all[G] = E_x E_mask ||g~_G(x) - g_G(x)||^2        (SUS in every layer)
    rho_l = V_sus,l / V_mb,   rho_all = V_sus,all / V_mb

The masks of different layers are independent and each layer's noise has mean zero, so to first order the
per-layer variances add up: sum_l rho_l ~ rho_all; with SUS in every layer, noise from layer l also passes
through the masks below it, a second-order term (the measurement checks the sum on paired draws). The same
draws also give V_sus,all / ||E g||^2 and V_sus,all / E||g||^2, the other normalisations a "relative
variance" can mean.

The speed trick. SUS leaves the forward exact and every layer above the SUS layer exact, so per window
one forward and one exact backward (which also returns dL/dO_l, the gradient at each layer's attention
output) serve every layer: SUS in layer l alone changes that layer's (dQ, dK, dV) by
delta_l = SUS backward(dO_l) - exact backward(dO_l), and the gradient by the vector-Jacobian product of
delta_l through (Q_l, K_l, V_l) down to the embeddings. The all-layer gradient is one more backward with
every layer's SUS mask on (the masks' seeds are the per-layer draws). tests/test_bench.py checks the
staged gradient against a full backward with SUS in that layer only.

Every one of ``--windows`` windows gives an exact gradient (V_mb) and ``--draws`` all-layer SUS draws;
``--layer-windows`` of them (spread evenly) also get ``--layer-draws`` per-layer draws (a draw: every
layer alone, then all layers with the same seeds). Intervals: percentile bootstrap over windows.
Writes the JSON after every window and the plot at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import tempfile
import time
import warnings

import numpy as np
import torch
from tqdm import tqdm
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from quietstar.assets import offline_smollm2
from quietstar.attention import padding_mask
from quietstar.ops import sus
from quietstar.ops.sus import design_a_reference, reference
from sus_variance import token_windows  # bench/sus_variance.py, a sibling

ATTENTION_NAME = "sus_variance_layers"
LONG_TEXT = "/usr/share/vim/vim90/doc/options.txt"
KINDS = ("embed", "q", "k", "v", "o", "mlp", "norm")
PAPER = dict(n=2000, c=27.5, percent=1.0)


class SusPlacement:
    """Which layers' attention backward is SUS, and with which mask seed; read by :func:`placed_attention`.

    ``staged=True``: every layer runs :class:`ControlledAttention` and records what the staged per-layer
    backward needs (``records[layer]``: q, k, v, o, lse, the attention rule (scale, window, softcap) and
    ``output``, o in the graph); otherwise
    every layer calls the library's ``quietstar.ops.sus.attention``.
    """

    def __init__(self, c: float):
        self.c = c
        self.seeds: dict[int, int] = {}  # layer -> seed of its SUS mask; layers not here are exact
        self.staged = False
        self.records: dict[int, dict] = {}

    def setting(self, layer: int):
        """(c, seed) for this layer's backward: (None, 0) is the exact backward."""
        return (self.c, self.seeds[layer]) if layer in self.seeds else (None, 0)


PLACEMENT = SusPlacement(c=30.0)


class ControlledAttention(torch.autograd.Function):
    """Exact attention (the SUS reference's forward) whose backward is SUS or exact as PLACEMENT says at backward
    time, so one recorded graph serves the exact and the SUS backward. q ``[B, H, n, d]``, k/v ``[B, Hkv, n, d]``."""

    @staticmethod
    def forward(ctx, q, k, v, layer, rule):
        o, lse = reference.attention_forward(q, k, v, num_text=q.shape[2], **rule)
        PLACEMENT.records[layer] = dict(o=o, lse=lse, rule=rule)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.layer, ctx.rule = layer, rule
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        c, seed = PLACEMENT.setting(ctx.layer)
        dq, dk, dv = design_a_reference.attention_backward(q, k, v, o, lse, do, num_text=q.shape[2], c=c, seed=seed,
                                                           **ctx.rule)
        return dq, dk, dv, None, None


def placed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                     softcap=None, **kwargs):
    """transformers' attention convention (returns ``[B, n, H, d]``, None); causal, with the layer's sliding window
    and soft-capping, no padding, no dropout."""
    if attention_mask is not None or (dropout and module.training):
        raise ValueError("bench/sus_variance_layers.py measures unpadded causal windows without dropout: pass no "
                         "attention_mask and keep the model in eval mode.")
    rule = dict(scale=query.shape[-1] ** -0.5 if scaling is None else scaling, window=sliding_window, softcap=softcap)
    layer = module.layer_idx
    if PLACEMENT.staged:
        out = ControlledAttention.apply(query, key, value, layer, rule)
        PLACEMENT.records[layer].update(q=query, k=key, v=value, output=out)
    else:
        c, seed = PLACEMENT.setting(layer)
        out = sus.attention(query, key, value, c=c, seed=seed, backend="torch", **rule)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, placed_attention)
AttentionMaskInterface.register(ATTENTION_NAME, padding_mask)


def parameter_groups(names: list[str], num_layers: int) -> tuple[list[str], torch.Tensor]:
    """Column names and a 0/1 matrix [parameters, columns]: "all", one column per kind (KINDS; "embed" is the input
    embeddings with the output head, tied in SmolLM2), one per layer of parameters ("embed", "0".."L-1", "final":
    the embeddings and head, each decoder layer, the final norm)."""
    columns = ["all"] + [f"kind:{k}" for k in KINDS] + ["layer:embed"] + [f"layer:{i}" for i in range(num_layers)]
    columns.append("layer:final")
    matrix = torch.zeros(len(names), len(columns), dtype=torch.float64)
    for row, name in enumerate(names):
        match = re.search(r"layers\.(\d+)\.", name)
        if "embed" in name or "lm_head" in name or "wte" in name:
            kind, where = "embed", "embed"
        else:
            kind = next((k for k, key in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj"),
                                          ("mlp", "mlp."), ("norm", "norm")) if key in name), None)
            where = match.group(1) if match else "final"
        if kind is None:
            raise ValueError(f"Parameter {name!r} fits none of the groups {KINDS}; extend parameter_groups.")
        for column in ("all", f"kind:{kind}", f"layer:{where}"):
            matrix[row, columns.index(column)] = 1.0
    return columns, matrix


def squared_norms(tensors, groups: torch.Tensor) -> list[float]:
    """Squared norm of each column's slice of ``tensors`` (one per parameter, None counts as zero)."""
    per_param = torch.tensor([0.0 if t is None else torch.linalg.vector_norm(t, dtype=torch.float64).item() ** 2
                              for t in tensors], dtype=torch.float64)
    return (per_param @ groups).tolist()


def record_window(model, params, window):
    """One forward with every layer recorded and one exact backward: (loss, exact gradient per parameter,
    records per layer, dL/dO per layer). The graph stays alive for the staged backwards."""
    PLACEMENT.staged, PLACEMENT.seeds, PLACEMENT.records = True, {}, {}
    try:
        loss = model(input_ids=window[None], labels=window[None]).loss
    finally:
        PLACEMENT.staged = False
    records = dict(PLACEMENT.records)
    PLACEMENT.records = {}
    order = sorted(records)
    grads = torch.autograd.grad(loss, list(params) + [records[l]["output"] for l in order], retain_graph=True,
                                allow_unused=True)
    exact = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return loss, exact, records, dict(zip(order, grads[len(params):]))


def staged_noise(params, record, d_out, seed, exact_qkv=None) -> list:
    """g~_l - g, one tensor (or None) per parameter: the change SUS in this one layer makes to the gradient, as the
    vector-Jacobian product of delta_l = SUS (dQ, dK, dV) - exact (dQ, dK, dV) through the recorded (Q, K, V).
    ``exact_qkv``: this layer's exact (dQ, dK, dV) when already computed."""
    r = record
    inputs = (r["q"].detach(), r["k"].detach(), r["v"].detach(), r["o"], r["lse"], d_out)
    if exact_qkv is None:
        exact_qkv = reference.attention_backward(*inputs, num_text=r["q"].shape[2], **r["rule"])
    sus_qkv = design_a_reference.attention_backward(*inputs, num_text=r["q"].shape[2], c=PLACEMENT.c, seed=seed,
                                                    **r["rule"])
    delta = [s - e for s, e in zip(sus_qkv, exact_qkv)]
    return list(torch.autograd.grad((r["q"], r["k"], r["v"]), params, grad_outputs=delta, retain_graph=True,
                                    allow_unused=True))


def all_layer_gradient(loss, params, seeds) -> list:
    """The gradient with a SUS backward in every layer (layer l's mask from seeds[l]), from a recorded graph."""
    PLACEMENT.seeds = {layer: int(seed) for layer, seed in enumerate(seeds)}
    try:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    finally:
        PLACEMENT.seeds = {}
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def window_draws(model, params, window, seeds, groups, layers, layer_draws: int) -> dict:
    """One exact gradient and the SUS draws of one window. ``seeds`` ``[draws, num_layers]``: each draw's mask seed
    per layer. Returns the exact gradient and, per draw, the squared norms [columns] of g~ - g with SUS in every
    layer (a full backward) and, for the first ``layer_draws`` draws, of g~_l - g for each layer in ``layers``, in
    that order (staged, with the same seeds)."""
    loss, exact, records, d_out = record_window(model, params, window)
    exact_qkv = {}
    draws = []
    for index, draw_seeds in enumerate(seeds):
        draw = {}
        if index < layer_draws:
            draw["per_layer"] = []
            for layer in layers:
                r = records[layer]
                if layer not in exact_qkv:
                    exact_qkv[layer] = reference.attention_backward(
                        r["q"].detach(), r["k"].detach(), r["v"].detach(), r["o"], r["lse"], d_out[layer],
                        num_text=r["q"].shape[2], **r["rule"])
                noise = staged_noise(params, r, d_out[layer], int(draw_seeds[layer]), exact_qkv[layer])
                draw["per_layer"].append(squared_norms(noise, groups))
        full = all_layer_gradient(loss, params, draw_seeds)
        draw["all_layers"] = squared_norms([f - e for f, e in zip(full, exact)], groups)
        draws.append(draw)
    return dict(exact=exact, draws=draws)


def gradient(model, params, window) -> list[torch.Tensor]:
    """The gradient of one window through the library's sus.attention: exact, or SUS in the layers PLACEMENT.seeds
    names."""
    PLACEMENT.staged = False
    loss = model(input_ids=window[None], labels=window[None]).loss
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def long_text_windows(tokenizer, path: str, count: int, length: int) -> list[torch.Tensor]:
    """``count`` windows of ``length`` tokens spread evenly over one long text file (no joins, no EOS)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        stream = tokenizer(f.read(), add_special_tokens=False).input_ids
    stride = (len(stream) - length) // count
    if stride < length:
        raise ValueError(f"{path} holds {len(stream)} tokens: too few for {count} disjoint windows of {length}; "
                         "use fewer --windows, a smaller --length or a longer --long-text.")
    return [torch.tensor(stream[i * stride:i * stride + length]) for i in range(count)]


def gram_of_stored(store: np.memmap, offsets: list[tuple[int, int]], groups: torch.Tensor, chunk: int = 1 << 20):
    """Gram matrices [columns, K, K] of the stored per-window gradients (bf16 kept as int16 bits)."""
    K = store.shape[0]
    per_param = torch.zeros(len(offsets), K, K, dtype=torch.float64)
    for index, (start, stop) in enumerate(offsets):
        for lo in range(start, stop, chunk):
            bits = torch.from_numpy(np.ascontiguousarray(store[:, lo:min(stop, lo + chunk)]))
            block = bits.view(torch.bfloat16).to(torch.float32)
            per_param[index] += (block @ block.T).double()
    return torch.einsum("pkj,pc->ckj", per_param, groups)


def minibatch_variance_from_gram(gram: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """V_mb per column from Gram matrices [C, K, K] and window multiplicities ``weights`` [..., K] (sum K):
    (sum_k w_k G_kk - w^T G w / K) / (K - 1). Returns [..., C]."""
    K = gram.shape[-1]
    diag = torch.diagonal(gram, dim1=-2, dim2=-1)  # [C, K]
    quad = torch.einsum("...k,ckj,...j->...c", weights, gram, weights)
    return (weights @ diag.T - quad / K) / (K - 1)


def summarise(raw: dict, gram: torch.Tensor, columns: list[str], layers: list[int], boot: int, seed: int) -> dict:
    """Point estimates and percentile-bootstrap 95 % intervals of every ratio. The windows are resampled together
    for V_mb and the all-layer draws (the same windows); the per-layer windows are resampled among themselves."""
    windows = raw["windows"]
    K = len(windows)
    layer_rows = [i for i, w in enumerate(windows) if "per_layer" in w["draws"][0]]
    all_layers = torch.tensor([[d["all_layers"] for d in w["draws"]] for w in windows], dtype=torch.float64).mean(1)
    exact_sq = torch.tensor([w["exact_squared_norm"] for w in windows], dtype=torch.float64)  # [K, C]
    per_layer = torch.tensor([[d["per_layer"] for d in windows[i]["draws"] if "per_layer" in d] for i in layer_rows],
                             dtype=torch.float64).mean(1)  # [S, layers, C]
    paired_all = torch.tensor([[d["all_layers"] for d in windows[i]["draws"] if "per_layer" in d] for i in layer_rows],
                              dtype=torch.float64).mean(1)  # [S, C]: the all-layer draws with the per-layer seeds
    generator = torch.Generator().manual_seed(seed)
    S = len(layer_rows)
    idx = torch.cat([torch.arange(K)[None], torch.randint(0, K, (boot, K), generator=generator)])  # row 0: the sample
    weights = torch.zeros(boot + 1, K, dtype=torch.float64).scatter_add_(1, idx, torch.ones(boot + 1, K,
                                                                                              dtype=torch.float64))
    layer_idx = torch.cat([torch.arange(S)[None], torch.randint(0, S, (boot, S), generator=generator)])
    v_mb = minibatch_variance_from_gram(gram, weights)  # [1+boot, C]
    mean_sq = weights @ torch.diagonal(gram, dim1=-2, dim2=-1).T / K  # E||g||^2
    mean_g_sq = torch.einsum("bk,ckj,bj->bc", weights, gram, weights) / K**2 - v_mb / K  # ||E g||^2, unbiased
    v_all = weights @ all_layers / K  # [1+boot, C]
    v_layer = per_layer[layer_idx].mean(1)  # [1+boot, layers, C]
    rho_layer = v_layer / v_mb[:, None, :]

    def stat(x):
        x = x.numpy()
        with warnings.catch_warnings():  # a column SUS never reaches (the final norm) gives 0/0 ratios: NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            lo, hi = np.nanpercentile(x[1:], [2.5, 97.5], axis=0)
        return dict(value=x[0].tolist(), low=lo.tolist(), high=hi.tolist())

    return dict(
        columns=columns, layers=layers, windows=K, draws=len(windows[0]["draws"]), layer_windows=S,
        layer_draws=sum("per_layer" in d for d in windows[layer_rows[0]]["draws"]), bootstrap=boot,
        minibatch_variance=stat(v_mb), mean_squared_gradient_norm=stat(mean_sq),
        squared_mean_gradient_norm=stat(mean_g_sq), sus_variance_all=stat(v_all), sus_variance_per_layer=stat(v_layer),
        rho_all=stat(v_all / v_mb), rho_per_layer=stat(rho_layer), rho_sum_of_layers=stat(rho_layer.sum(1)),
        sum_of_layers_over_all_paired=stat(per_layer.sum(1)[layer_idx].mean(1) / paired_all[layer_idx].mean(1)),
        all_over_squared_mean_gradient=stat(v_all / mean_g_sq), all_over_mean_squared_gradient=stat(v_all / mean_sq),
        all_over_own_window_gradient=stat((weights @ (all_layers / exact_sq)) / K),
    )


def finite(value):
    """``value`` with every NaN or infinity (a 0/0 ratio: a group SUS never reaches) as None, for strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id or folder; default: the offline SmolLM2-135M")
    parser.add_argument("--length", type=int, default=512, help="window length n in tokens")
    parser.add_argument("--c", type=float, default=30.0)
    parser.add_argument("--texts", nargs="+", default=["math", "long"], choices=["math", "long"],
                        help="math: MATH documents joined by EOS; long: one long text file (--long-text)")
    parser.add_argument("--long-text", default=LONG_TEXT, help="the long contiguous text (default: vim's options.txt)")
    parser.add_argument("--documents", type=int, default=None, help="use only the first N MATH documents")
    parser.add_argument("--windows", type=int, default=32,
                        help="windows (K): each gives an exact gradient (V_mb) and --draws all-layer SUS draws")
    parser.add_argument("--draws", type=int, default=1, help="all-layer SUS draws per window")
    parser.add_argument("--layer-windows", type=int, default=5,
                        help="of the windows, how many (spread evenly) also get SUS in one layer at a time")
    parser.add_argument("--layer-draws", type=int, default=1, help="per-layer draws on those (<= --draws)")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="layers measured alone (default: all)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--scratch", default=None, help="folder for the stored gradients (K x parameters, bf16)")
    parser.add_argument("--out", default="docs/results/sus_variance_layers.json")
    parser.add_argument("--plot", default="docs/sus_variance_layers.png", help="PNG path ('' for none)")
    args = parser.parse_args(argv)
    if args.windows < 2:
        parser.error("--windows must be at least 2 (the minibatch variance needs two windows).")
    if not 1 <= args.layer_windows <= args.windows:
        parser.error("--layer-windows must be between 1 and --windows.")
    if not 1 <= args.layer_draws <= args.draws or args.c <= 0:
        parser.error("--layer-draws must be between 1 and --draws, and --c > 0.")
    return args


def text_windows(tokenizer, text: str, args) -> list[torch.Tensor]:
    if text == "math":
        return token_windows(tokenizer, args.windows, args.length, args.documents)
    return long_text_windows(tokenizer, args.long_text, args.windows, args.length)


def measure_text(model, params, groups, columns, windows, layers, args, text_index, progress, save) -> dict:
    """Every window's exact gradient (stored for V_mb) and SUS draws; then the summary."""
    K, num_layers = len(windows), model.config.num_hidden_layers
    layer_windows = {k * K // args.layer_windows for k in range(args.layer_windows)}
    sizes = [p.numel() for p in params]
    offsets = list(zip(np.cumsum([0] + sizes[:-1]).tolist(), np.cumsum(sizes).tolist()))
    raw = dict(windows=[], seconds=[])
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        store = np.lib.format.open_memmap(os.path.join(scratch, "gradients.npy"), mode="w+", dtype=np.int16,
                                          shape=(K, sum(sizes)))
        total, squares = None, torch.zeros(len(columns), dtype=torch.float64)
        for k, window in enumerate(windows):
            started = time.perf_counter()
            generator = torch.Generator().manual_seed(args.seed * 1_000_003 + text_index * 10_007 + k)
            seeds = torch.randint(0, 2**31 - 1, (args.draws, num_layers), generator=generator)
            layer_draws = args.layer_draws if k in layer_windows else 0
            result = window_draws(model, params, window, seeds, groups, layers, layer_draws)
            grad = result["exact"]
            raw["windows"].append(dict(window=k, exact_squared_norm=squared_norms(grad, groups), draws=result["draws"]))
            flat = torch.cat([g.detach().reshape(-1) for g in grad])
            store[k] = flat.to(torch.bfloat16).view(torch.int16).numpy()
            total = flat.double() if total is None else total.add_(flat)
            squares += torch.tensor(squared_norms(grad, groups), dtype=torch.float64)
            raw["seconds"].append(time.perf_counter() - started)
            progress.update(1)
            save(raw)
        sum_sq = torch.tensor(squared_norms(torch.split(total, sizes), groups), dtype=torch.float64)
        store.flush()
        gram = gram_of_stored(store, offsets, groups)
    summary = summarise(raw, gram, columns, layers, args.bootstrap, args.seed)
    summary["minibatch_variance_fp64"] = ((squares - sum_sq / K) / (K - 1)).tolist()  # the bootstrap's Gram is bf16
    return dict(raw=raw, summary=summary)


def print_table(results: dict, columns: list[str]) -> None:
    def cell(stat, index=None):
        value, low, high = (stat[key] if index is None else stat[key][index] for key in ("value", "low", "high"))
        return f"{100 * value:7.2f} [{100 * low:.2f}, {100 * high:.2f}]"

    all_column = columns.index("all")
    for text, entry in results.items():
        s = entry["summary"]
        print(f"\n{text}: n = {entry['length']}, c = {entry['c']:g}, {s['windows']} windows x {s['draws']} all-layer "
              f"draws, per layer on {s['layer_windows']} windows x {s['layer_draws']}; % with bootstrap 95 % intervals")
        for name, key in (("V_sus,all / V_mb", "rho_all"), ("sum_l V_sus,l / V_mb", "rho_sum_of_layers"),
                          ("V_sus,all / ||E g||^2", "all_over_squared_mean_gradient"),
                          ("V_sus,all / E||g||^2", "all_over_mean_squared_gradient"),
                          ("E_x[V_sus,all(x) / ||g(x)||^2]", "all_over_own_window_gradient"),
                          ("sum_l V_sus,l / V_sus,all (paired)", "sum_of_layers_over_all_paired")):
            print(f"  {name:32s} {cell(s[key], all_column)}")
        kinds = [c for c in columns if c.startswith("kind:")]
        print("  per kind, SUS in all layers:  " + "  ".join(
            f"{c.split(':')[1]} {100 * s['rho_all']['value'][columns.index(c)]:.2f}" for c in kinds))
        print("  rho_l (all parameters), layer by layer:  " + " ".join(
            f"{100 * row[all_column]:.2f}" for row in s["rho_per_layer"]["value"]))


def error_bars(value, low, high) -> np.ndarray:
    """matplotlib's [2, N] distances from the point to the interval's ends (0 where a few-window bootstrap's
    interval misses its own point estimate, or is NaN)."""
    value = np.asarray(value)
    return np.nan_to_num(np.clip([value - np.asarray(low), np.asarray(high) - value], 0, None))


def plot(results: dict, columns: list[str], path: str, model_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_column = columns.index("all")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw=dict(width_ratios=[3, 1]))
    for offset, (text, entry) in zip((-0.15, 0.15), results.items()):
        s = entry["summary"]
        layers = np.array(s["layers"]) + offset
        rho = [100 * row[all_column] for row in s["rho_per_layer"]["value"]]
        low = [100 * row[all_column] for row in s["rho_per_layer"]["low"]]
        high = [100 * row[all_column] for row in s["rho_per_layer"]["high"]]
        left.errorbar(layers, rho, yerr=error_bars(rho, low, high), fmt="o", ms=3, capsize=2,
                      label=f"{text} (n = {entry['length']}, c = {entry['c']:g})")
    left.set_yscale("log")
    left.set_xlabel("layer with SUS backward (all other layers exact)")
    left.set_ylabel("rho_l = V_sus,l / V_mb, %  (95 % bootstrap)")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    names = []
    for i, (text, entry) in enumerate(results.items()):
        s = entry["summary"]
        for j, key in enumerate(("rho_sum_of_layers", "rho_all")):
            value, low, high = (100 * s[key][part][all_column] for part in ("value", "low", "high"))
            right.errorbar([2 * i + j], [value], yerr=error_bars([value], [low], [high]), fmt="s", capsize=3,
                           color=f"C{i}", alpha=1.0 if j else 0.6)
            names.append(f"{text}\n{'sum rho_l' if j == 0 else 'all layers'}")
    right.axhline(PAPER["percent"], color="black", ls="--", lw=1, label="paper: ~1 % (OPT-125m, n~2000)")
    right.set_xticks(range(len(names)), names, fontsize=7)
    right.set_ylabel("% of V_mb")
    right.set_ylim(bottom=0)
    right.legend(fontsize=7)
    right.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"SUS gradient variance by layer: {model_name.split(' (')[0]}", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = args.model or offline_smollm2()
    model_name = args.model or "SmolLM2-135M-Instruct (offline GGUF, dequantised)"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=ATTENTION_NAME).eval()
    PLACEMENT.c = args.c
    num_layers = model.config.num_hidden_layers
    layers = sorted(set(args.layers)) if args.layers else list(range(num_layers))
    if not all(0 <= layer < num_layers for layer in layers):
        raise SystemExit(f"--layers must lie in 0..{num_layers - 1}.")
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    columns, groups = parameter_groups(list(names), num_layers)
    windows = {text: text_windows(tokenizer, text, args) for text in args.texts}
    results = {}
    document = dict(model=model_name, settings=vars(args), columns=columns, results=results,
                    definitions=__doc__.split("\n\n")[2])

    def write():
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".tmp", "w") as f:
            json.dump(finite(document), f, allow_nan=False)
        os.replace(args.out + ".tmp", args.out)

    with tqdm(total=len(args.texts) * args.windows, desc="windows", unit="window") as progress:
        for index, text in enumerate(args.texts):
            label = "MATH" if text == "math" else os.path.basename(args.long_text)
            results[label] = dict(length=args.length, c=args.c, partial=True)

            def save(raw, label=label):  # after every window, so a run that stops keeps what it measured
                results[label]["raw"] = raw
                write()

            results[label] = dict(length=args.length, c=args.c,
                                  **measure_text(model, list(params), groups, columns, windows[text], layers, args,
                                                 index, progress, save))
            write()
    print_table(results, columns)
    print(f"wrote {args.out}")
    if args.plot:
        plot(results, columns, args.plot, model_name)
    if not all(math.isfinite(e["summary"]["rho_all"]["value"][0]) for e in results.values()):
        raise SystemExit("non-finite variance: see the JSON")


if __name__ == "__main__":
    main()

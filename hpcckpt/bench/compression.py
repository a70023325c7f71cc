"""``hpcckpt bench compression``: what ``compression="zstd"`` saves in bytes and costs in time (issue 14).

Random tensors would say nothing (random fp32 mantissas do not compress), and nothing is downloaded here,
so the bench trains its own model first: a small transformer language model (``--width``, ``--layers``)
trained with AdamW for ``--train-steps`` steps on sequences drawn from a fixed random bigram chain, a task
it learns. Three states of that trained model are measured: its fp32 weights, the same cast to bf16, and
the whole training state (fp32 weights and AdamW's two moments), each saved and loaded by a store with no
compression and with zstd at each of ``--levels``. Saves and loads are interleaved, the order rotated each
round, medians reported. Figures: ratio (raw tensor bytes over file bytes), and save and load speed in
MB/s of the raw state (so a faster figure means the state is through sooner, whatever its size on disk).
Loads are warm (the file in the page cache): they measure decompression, not the disk.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from .targets import Target

Figures = dict[str, Any]
QUICK = {"width": 64, "layers": 1, "train_steps": 3, "repeats": 1}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--width", type=int, default=256, help="compression: the transformer's model width")
    parser.add_argument("--layers", type=int, default=4, help="compression: transformer layers")
    parser.add_argument("--train-steps", type=int, default=300, help="compression: AdamW steps before measuring")
    parser.add_argument("--levels", default="1,3,9", help="compression: zstd levels to measure, e.g. 1,3,9,19")


def run(root: Path, args: argparse.Namespace) -> tuple[Figures, list[Target]]:
    from ..errors import UsageError
    from ..store.formats.zstdframes import MAX_LEVEL, MIN_LEVEL

    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    try:
        levels = [int(level) for level in args.levels.split(",")]
    except ValueError:
        levels = []
    if not levels or not all(MIN_LEVEL <= level <= MAX_LEVEL for level in levels):
        raise UsageError(f"Invalid --levels {args.levels!r}: expected zstd levels {MIN_LEVEL}-{MAX_LEVEL}, e.g. 1,3,9")
    if min(args.width, args.layers, args.train_steps) < 1 or args.width % 4:
        raise UsageError("Invalid --width/--layers/--train-steps: whole numbers >= 1, --width a multiple of 4")
    model, losses = _trained(args.width, args.layers, args.train_steps)
    print(
        f"hpcckpt bench compression in {root}: a transformer (width {args.width}, {args.layers} layers) trained "
        f"{args.train_steps} steps, loss {losses[0]:.2f} -> {losses[-1]:.2f}; {args.repeats} interleaved repeats"
    )
    figures: Figures = {"repeats": args.repeats, "train_loss": [losses[0], losses[-1]], "states": {}}
    targets: list[Target] = []
    for label, state in _states(model).items():
        targets += _measure(root / label.replace(" ", "-"), label, state, levels, args.repeats, figures)
    return figures, targets


def _trained(width: int, layers: int, steps: int) -> tuple[Any, list[float]]:
    """A transformer language model trained on a fixed random bigram chain (a task it can learn)."""
    import torch
    from torch import nn

    vocab, length, batch = 512, 64, 16
    torch.manual_seed(0)
    chain = torch.softmax(torch.randn(vocab, vocab) * 3, dim=-1)  # peaked: each token has a few likely successors

    class LanguageModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, width)
            self.position = nn.Parameter(torch.zeros(length, width))
            layer = nn.TransformerEncoderLayer(width, width // 64 or 1, 4 * width, dropout=0.0, batch_first=True)
            self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.head = nn.Linear(width, vocab)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
            logits: torch.Tensor = self.head(self.body(self.embed(tokens) + self.position, mask=mask, is_causal=True))
            return logits

    model = LanguageModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    losses = []
    for _ in range(steps):
        tokens = torch.empty(batch, length + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(vocab, (batch,))
        for t in range(length):
            tokens[:, t + 1] = torch.multinomial(chain[tokens[:, t]], 1).squeeze(1)
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        losses.append(float(loss.detach()))
    return (model, optimizer), losses


def _states(trained: Any) -> dict[str, dict[str, Any]]:
    import torch

    model, optimizer = trained
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {
        "fp32 weights": weights,
        "bf16 weights": {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in weights.items()},
        "fp32 weights+AdamW": {"model": weights, "optimizer": optimizer.state_dict()},
    }


def _raw_bytes(state: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(state))


def _compress_only(state: Any, level: int) -> None:
    """Compress every tensor of ``state`` in memory as a save would, writing nowhere: the CPU's part."""
    import torch

    from ..store.formats.zstdframes import Compression, FrameWriter

    class Nowhere:
        def write(self, data: Any) -> None:
            pass

    frames = FrameWriter(Compression("zstd", level), Nowhere())
    for tensor in _tensors(state):
        frames.write(memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))


def _tensors(state: Any) -> list[Any]:
    import torch

    if isinstance(state, torch.Tensor):
        return [state]
    values = state.values() if isinstance(state, dict) else state if isinstance(state, list | tuple) else ()
    return [t for v in values for t in _tensors(v)]


def _measure(
    root: Path, label: str, state: dict[str, Any], levels: list[int], repeats: int, figures: Figures
) -> list[Target]:
    from ..store.store import CheckpointStore
    from .rows import Trial, interleave

    raw = _raw_bytes(state)
    settings: dict[str, dict[str, Any]] = {"none": {}}
    settings.update({f"zstd-{level}": {"compression": "zstd", "compression_level": level} for level in levels})
    stores = {name: CheckpointStore(root / name, keep_last=1, **options) for name, options in settings.items()}
    steps = dict.fromkeys(stores, 0)

    def saving(name: str) -> Trial:
        def work() -> None:
            steps[name] += 1
            stores[name].save(state, step=steps[name])

        return Trial(work)

    def loading(name: str) -> Trial:
        def work() -> None:
            stores[name].load(mmap=False)

        return Trial(work)

    def compressing(level: int) -> Trial:
        return Trial(lambda: _compress_only(state, level))

    saves = interleave(repeats, {name: saving(name) for name in stores})
    loads = interleave(repeats, {name: loading(name) for name in stores})
    cpu = interleave(repeats, {f"zstd-{level}": compressing(level) for level in levels})
    sizes = {name: store.list()[-1].size for name, store in stores.items()}
    shutil.rmtree(root)
    print(f"\n{label}: {raw / 2**20:.1f} MiB of tensors")
    rows: dict[str, dict[str, float]] = {}
    targets = []
    for name in stores:
        save_rate, load_rate = raw / saves[name].wall / 1e6, raw / loads[name].wall / 1e6
        ratio = raw / sizes[name]
        rows[name] = {"ratio": ratio, "save_mb_s": save_rate, "load_mb_s": load_rate, "file_bytes": sizes[name]}
        print(f"  {name:<8} ratio {ratio:5.2f}  save {save_rate:7.0f} MB/s  load (warm) {load_rate:7.0f} MB/s")
        if name != "none":
            rows[name]["compress_mb_s"] = raw / cpu[name].wall / 1e6
            print(f"  {'':<8} zstd alone (one thread, in memory): {rows[name]['compress_mb_s']:7.0f} MB/s")
            targets += [
                Target(f"compression, {label}: {name} ratio", ratio, "info"),
                Target(f"compression, {label}: {name} save MB/s / none", save_rate / rows["none"]["save_mb_s"], "info"),
                Target(f"compression, {label}: {name} load MB/s / none", load_rate / rows["none"]["load_mb_s"], "info"),
            ]
    figures["states"][label] = {"raw_bytes": raw, "rows": rows}
    return targets

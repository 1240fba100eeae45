"""ResNet structure specs: the nine of the paper's Table 1, and the user's own.

`python -m fastres.structures` prints each built-in structure with its parameter count and
forward GFLOP per image. Both are counted from the spec, layer by layer, with no torch: planning
and spec checks run without the model (tests/test_models.py checks both against the built model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass

PARAM_BUDGET = 5_000_000
IMAGE_SIZE = 32
FIELDS = ("N", "B", "C_in", "F0", "P0", "F1", "P1", "K")
NUM_CLASSES = 10  # CIFAR-10


class SpecError(ValueError):
    """A structure spec that cannot be built; the message names the bad field."""


@dataclass(frozen=True)
class ResNetSpec:
    """Table 1's knobs: N layers of B[i] blocks, C_in stem channels, stem kernel F0 / padding P0,
    block kernel F1 / padding P1, and K the projection-shortcut kernel."""

    N: int
    B: tuple[int, ...]
    C_in: int
    F0: int
    P0: int
    F1: int
    P1: int
    K: int = 1

    @classmethod
    def parse(cls, text: str) -> ResNetSpec:
        """Parse `"N=2 B=1,1 C_in=16 F0=3 P0=1 F1=3 P1=1 K=1"` (K may be left out)."""
        values: dict[str, object] = {}
        for token in text.replace(";", " ").split():
            key, sep, raw = token.partition("=")
            if not sep or not raw:
                raise SpecError(f"spec token {token!r} is not FIELD=VALUE (fields: {FIELDS})")
            if key not in FIELDS:
                raise SpecError(f"unknown spec field {key!r} (fields: {', '.join(FIELDS)})")
            if key in values:
                raise SpecError(f"spec field {key} given twice")
            try:
                if key == "B":
                    values[key] = tuple(int(b) for b in raw.split(",") if b != "")
                else:
                    values[key] = int(raw)
            except ValueError:
                raise SpecError(f"spec field {key}={raw!r} is not an integer"
                                + (" list like 2,1,1,1" if key == "B" else "")) from None
        missing = [f for f in FIELDS if f not in values and f != "K"]
        if missing:
            raise SpecError(f"spec is missing field(s) {', '.join(missing)}")
        return cls(**values)  # type: ignore[arg-type]

    def __str__(self) -> str:
        b = ",".join(str(x) for x in self.B)
        return (f"N={self.N} B={b} C_in={self.C_in} F0={self.F0} P0={self.P0} "
                f"F1={self.F1} P1={self.P1} K={self.K}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["B"] = list(self.B)
        return d

    def layer_channels(self) -> list[int]:
        return [self.C_in * 2**i for i in range(self.N)]

    def validate(self, budget: int = PARAM_BUDGET) -> ResNetSpec:
        """Raise SpecError naming the first bad field; return self when the spec builds."""
        if not isinstance(self.B, tuple):
            raise SpecError(f"B must be a tuple of ints, got {self.B!r}")
        for name in ("N", "C_in", "F0", "F1", "K"):
            if getattr(self, name) <= 0:
                raise SpecError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("P0", "P1"):
            if getattr(self, name) < 0:
                raise SpecError(f"{name} must be zero or positive, got {getattr(self, name)}")
        if len(self.B) != self.N:
            raise SpecError(f"B has {len(self.B)} entries but N={self.N}: len(B) must equal N")
        for i, b in enumerate(self.B):
            if b <= 0:
                raise SpecError(f"B[{i}] must be positive, got {b}")
        feature_map_sizes(self)  # raises on a kernel/padding pair that shrinks the map away
        n = param_count(self)
        if n > budget:
            raise SpecError(f"spec {self} has {n:,} parameters, over the budget of {budget:,} "
                            "(raise it with --param-budget)")
        return self


def _conv_out(size: int, kernel: int, padding: int, stride: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def feature_map_sizes(spec: ResNetSpec, image: int = IMAGE_SIZE) -> list[int]:
    """Spatial size after the stem and after each layer; raises SpecError where it breaks."""
    h = _conv_out(image, spec.F0, spec.P0, 1)
    if h < 1:
        raise SpecError(f"F0={spec.F0} with P0={spec.P0} shrinks the {image}x{image} input to "
                        "nothing (need F0 <= 32 + 2*P0)")
    sizes = [h]
    in_ch = spec.C_in
    for i, (ch, blocks) in enumerate(zip(spec.layer_channels(), spec.B, strict=True)):
        for j in range(blocks):
            stride = 2 if (i > 0 and j == 0) else 1
            h1 = _conv_out(h, spec.F1, spec.P1, stride)
            h2 = _conv_out(h1, spec.F1, spec.P1, 1) if h1 >= 1 else 0
            if h2 < 1:
                raise SpecError(f"F1={spec.F1} with P1={spec.P1} shrinks the feature map to "
                                f"nothing in layer {i + 1} block {j + 1} (input {h}x{h})")
            if stride == 1 and in_ch == ch:
                if h2 != h:
                    raise SpecError(
                        f"F1={spec.F1} with P1={spec.P1} changes the feature map from {h} to "
                        f"{h2} in layer {i + 1} block {j + 1}, which has an identity shortcut: "
                        "use 'same' padding P1 = (F1 - 1) / 2")
            else:
                hs = _conv_out(h, spec.K, 0, stride)
                if hs != h2:
                    raise SpecError(
                        f"K={spec.K} gives a {hs}x{hs} shortcut but the block's convolutions "
                        f"(F1={spec.F1}, P1={spec.P1}) give {h2}x{h2} in layer {i + 1} "
                        f"block {j + 1}")
            h, in_ch = h2, ch
        sizes.append(h)
    return sizes


def _convs(spec: ResNetSpec, image: int = IMAGE_SIZE) -> Iterator[tuple[int, int, int, int]]:
    """(in channels, out channels, kernel, output size) of each convolution of the model, in
    fastres.study.models.ResNet's order; each is followed by a BatchNorm of its output channels."""
    h = _conv_out(image, spec.F0, spec.P0, 1)
    yield 3, spec.C_in, spec.F0, h
    in_ch = spec.C_in
    for i, (ch, blocks) in enumerate(zip(spec.layer_channels(), spec.B, strict=True)):
        for j in range(blocks):
            stride = 2 if (i > 0 and j == 0) else 1
            h1 = _conv_out(h, spec.F1, spec.P1, stride)
            h2 = _conv_out(h1, spec.F1, spec.P1, 1)
            yield in_ch, ch, spec.F1, h1
            yield ch, ch, spec.F1, h2
            if stride != 1 or in_ch != ch:  # projection shortcut
                yield in_ch, ch, spec.K, _conv_out(h, spec.K, 0, stride)
            h, in_ch = h2, ch


def param_count(spec: ResNetSpec) -> int:
    """Trainable parameters of the built model: conv weights (no bias), BN weight and bias, and
    the linear head."""
    convs = sum(i * o * k * k + 2 * o for i, o, k, _h in _convs(spec))
    last = spec.layer_channels()[-1]
    return convs + last * NUM_CLASSES + NUM_CLASSES


def forward_flop(spec: ResNetSpec) -> int:
    """FLOP of one forward pass for one image: 2 per multiply-add of the convolutions and the
    linear head (what fastres.study.models.forward_flops counts on the built model)."""
    convs = sum(2 * o * h * h * i * k * k for i, o, k, h in _convs(spec))
    return convs + 2 * spec.layer_channels()[-1] * NUM_CLASSES


STRUCTURES: dict[int, ResNetSpec] = {
    1: ResNetSpec(N=4, B=(2, 1, 1, 1), C_in=64, F0=3, P0=1, F1=3, P1=1, K=1),
    2: ResNetSpec(N=4, B=(2, 1, 1, 1), C_in=64, F0=5, P0=2, F1=3, P1=1, K=1),
    3: ResNetSpec(N=4, B=(2, 1, 1, 1), C_in=64, F0=7, P0=3, F1=3, P1=1, K=1),
    4: ResNetSpec(N=4, B=(2, 1, 1, 1), C_in=64, F0=9, P0=4, F1=3, P1=1, K=1),
    5: ResNetSpec(N=4, B=(2, 1, 1, 1), C_in=64, F0=11, P0=5, F1=3, P1=1, K=1),
    6: ResNetSpec(N=3, B=(5, 2, 1), C_in=64, F0=5, P0=2, F1=5, P1=2, K=1),
    7: ResNetSpec(N=3, B=(1, 1, 1), C_in=128, F0=3, P0=1, F1=3, P1=1, K=1),
    8: ResNetSpec(N=2, B=(1, 3), C_in=64, F0=7, P0=3, F1=7, P1=3, K=1),
    9: ResNetSpec(N=2, B=(3, 1), C_in=128, F0=7, P0=3, F1=5, P1=2, K=1),
}


def resolve(structure: int | None, spec: str | None, budget: int = PARAM_BUDGET) -> ResNetSpec:
    """The spec a CLI asked for: `--structure I` or `--spec "..."`, validated."""
    if spec is not None and structure is not None:
        raise SpecError("give --structure or --spec, not both")
    if spec is not None:
        return ResNetSpec.parse(spec).validate(budget)
    if structure is None:
        structure = 1
    if structure not in STRUCTURES:
        raise SpecError(f"--structure must be one of 1..9 (Table 1), got {structure}")
    return STRUCTURES[structure]


def describe(spec: ResNetSpec) -> dict:
    """Parameters and forward GFLOP per image of a valid spec."""
    return {
        "spec": spec.to_dict(),
        "params": param_count(spec),
        "gflop_per_image": forward_flop(spec) / 1e9,
        "feature_maps": feature_map_sizes(spec),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastres.structures", description=__doc__)
    ap.add_argument("--format", choices=("table", "json"), default="table")
    ap.add_argument("--spec", help="describe this custom spec instead of Table 1")
    ap.add_argument("--param-budget", type=int, default=PARAM_BUDGET,
                    help=f"largest parameter count --spec may have (default {PARAM_BUDGET:,})")
    args = ap.parse_args(argv)
    try:
        rows = ({"structure": "custom",
                 **describe(ResNetSpec.parse(args.spec).validate(args.param_budget))}
                if args.spec else None)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = [rows] if rows else [{"structure": i, **describe(s)} for i, s in STRUCTURES.items()]
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    print("| # | N | B | C_in | F0 | P0 | F1 | P1 | K | params | GFLOP/image |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = r["spec"]
        b = " ".join(str(x) for x in s["B"])
        print(f"| {r['structure']} | {s['N']} | {b} | {s['C_in']} | {s['F0']} | {s['P0']} | "
              f"{s['F1']} | {s['P1']} | {s['K']} | {r['params']:,} | {r['gflop_per_image']:.3f} |")
    return 0


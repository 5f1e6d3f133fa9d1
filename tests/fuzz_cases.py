"""Seeded random bad and edge-case inputs for every functional op, against its
torch twin (tests/test_fuzz.py runs this in a subprocess, so a crash is a
failure there, not the end of the test session).

    python tests/fuzz_cases.py --cases 300 --seed 0

Each case draws an op, a shape (zero-size dimensions, 0-d and 1-d inputs
included), a layout (contiguous, channels-last, transposed, expanded,
overlapping, sliced), a dtype (integer ones too), parameters and running
statistics (missing, of another length, dtype or device, sharing the
input's memory), special values (NaN, +-Inf, huge, tiny) and eps and
momentum edge values. bn_ext and torch run on copies of the same arguments.
The verdict, one JSON line a case:
  same        both raised the same exception type, or both returned results
              that agree (NaN where the other has NaN, otherwise bn_ext's
              error against float64 within 8 times torch's or the dtype's
              rounding), with the same running statistics;
  documented  a difference the README lists under "Where bn_ext differs
              from torch", with its name;
  differs     anything else, with what differed.
and every case checks that the caller's tensors are unchanged, except the
running statistics the op updates. The last line counts the verdicts. Each
case is printed before it runs, so a crash names it."""

import argparse
import json
import math
import random
import sys
import traceback

import torch
import torch.nn.functional as F

import bn_ext.functional as B
from conftest import ERROR_RATIO, ROUNDOFF, max_error  # tests/ is this script's folder

ACTIVATIONS = {None: lambda y: y, "relu": torch.relu, "silu": F.silu}
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def layer_norm_channels_twin(x, weight, bias, eps):
    y = F.layer_norm(x.movedim(1, -1), (x.shape[1],) if x.dim() > 1 else (), weight, bias, eps)
    return y.movedim(-1, 1)


def batch_norm_act_twin(x, rm, rv, w, b, training, momentum, eps, activation, residual):
    y = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    return ACTIVATIONS[activation](y if residual is None else y + residual)


CHANNEL_OPS = ("batch_norm", "batch_norm_act", "instance_norm", "group_norm", "layer_norm_channels")
STAT_OPS = ("batch_norm", "batch_norm_act", "instance_norm")

# The mistakes and edge values a case may hold, one at most, by op. Layouts
# and special input values are not mistakes: every case draws them.
COMMON_FAULTS = ["zero-size dim", "0-d input", "1-d input", "int input", "weight wrong length",
                 "weight wrong dtype", "weight 2-d", "nan weight", "eps 0", "eps 1e-30", "eps nan", "eps inf",
                 "eps negative"]
FAULTS = {
    "batch_norm": COMMON_FAULTS + ["momentum 0", "momentum 1", "momentum negative", "momentum 2", "momentum None",
                                   "one statistic", "statistics wrong length", "int statistics",
                                   "statistics share the input", "statistics share each other"],
    "instance_norm": COMMON_FAULTS + ["momentum 0", "momentum 1", "one statistic", "statistics wrong length",
                                      "statistics share the input"],
    "batch_norm_act": COMMON_FAULTS + ["momentum 0", "one statistic", "statistics wrong length",
                                       "statistics share the input", "residual broadcast", "residual other dtype"],
    "group_norm": COMMON_FAULTS + ["groups 0", "groups not dividing"],
    "layer_norm": COMMON_FAULTS + ["normalized_shape mismatched", "normalized_shape empty"],
    "rms_norm": COMMON_FAULTS + ["normalized_shape mismatched", "eps None"],
    "layer_norm_channels": COMMON_FAULTS,
}


class Case:
    """One drawn case: its description (JSON-able) and its arguments."""

    def __init__(self, rng: random.Random, index: int):
        self.rng = rng
        self.index = index
        self.op = rng.choice(sorted(FAULTS))
        self.fault = rng.choice(["none"] * 6 + FAULTS[self.op])
        self.desc = {"case": index, "op": self.op, "fault": self.fault}
        self.x = self.make_input()
        self.args = self.make_args()

    def generator(self, offset):
        return torch.Generator().manual_seed(self.index * 31 + offset)

    def make_input(self):
        rng, fault = self.rng, self.fault
        dims = {"0-d input": 0, "1-d input": 1}.get(fault, rng.choice([2, 3, 3, 4, 4, 4, 5]))
        shape = [rng.choice([1, 2, 3, 5, 8]) if d != 1 else rng.choice([1, 2, 3, 4, 6, 8]) for d in range(dims)]
        if self.op in STAT_OPS and dims >= 2 and math.prod(shape) // shape[1] < 2:
            shape[0] = 2  # more than one value per channel: a valid training batch
        if fault == "zero-size dim" and dims:
            shape[rng.randrange(dims)] = 0
        dtype = torch.int64 if fault == "int input" else rng.choice([*FLOATS, torch.float32])
        self.desc.update(shape=shape, dtype=str(dtype))
        base = torch.randn(shape, generator=self.generator(0), dtype=torch.float64) * 2 + 1
        values = rng.choice(["normal"] * 6 + ["nan", "inf", "-inf", "inf and -inf", "huge", "tiny", "large mean"])
        self.desc["values"] = values
        flat = base.view(-1)
        if flat.numel():
            where = rng.randrange(flat.numel())
            if values == "nan":
                flat[where] = math.nan
            elif values in ("inf", "-inf"):
                flat[where] = math.inf if values == "inf" else -math.inf
            elif values == "inf and -inf":
                flat[where], flat[rng.randrange(flat.numel())] = math.inf, -math.inf
            elif values == "huge":
                base *= 1e3 if dtype == torch.float16 else 1e15
            elif values == "tiny":
                base *= 1e-3 if dtype == torch.float16 else 1e-30
            elif values == "large mean":
                base += 1e2 if dtype in (torch.float16, torch.bfloat16) else 1e4
        x = base.round().to(dtype) if dtype == torch.int64 else base.to(dtype)
        layout = rng.choice(["contiguous"] * 4 + ["channels_last", "transposed", "expanded", "overlapping",
                                                 "sliced"])
        self.desc["layout"] = layout
        if layout == "channels_last" and x.dim() in (4, 5):
            x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        elif layout == "transposed" and x.dim() >= 2:
            x = x.transpose(0, -1).contiguous().transpose(0, -1)
        elif layout == "expanded" and x.dim() >= 1 and x.shape[0] > 0:
            x = x[:1].expand(x.shape)
        elif layout == "overlapping" and x.dim() >= 2 and x.numel() > 0:
            # Rows that overlap: each starts one element after the previous.
            strides = list(x.stride())
            strides[0] = 1
            x = torch.as_strided(x.contiguous().view(-1), x.shape, strides)
        elif layout == "sliced" and x.dim() >= 1:
            x = torch.cat([x, x], dim=-1)[..., ::2]
        return x

    def param(self, name, shape, dtype):
        """A weight or bias of `shape`, or the fault's wrong one."""
        p = torch.randn(shape, generator=self.generator(len(name)), dtype=torch.float64).to(dtype)
        fault = self.fault
        if name == "weight" and fault == "weight wrong length":
            return torch.randn(math.prod(shape) + 1).to(dtype)
        if name == "weight" and fault == "weight wrong dtype":
            return p.to(torch.float64 if dtype != torch.float64 else torch.float32)
        if name == "weight" and fault == "weight 2-d":
            return p.reshape(1, -1)
        if name == "weight" and fault == "nan weight" and p.numel():
            p.view(-1)[0] = math.nan
        return p

    def stats(self, C, dtype):
        fault = self.fault
        mean = torch.randn(C, generator=self.generator(3), dtype=torch.float64)
        mean, var = mean.to(dtype), (mean.abs() + 0.5).to(dtype)
        # None is valid where the op normalises with the batch's statistics.
        if self.training and self.rng.random() < 0.25 and fault not in ("one statistic", "statistics wrong length"):
            return None, None
        if fault == "one statistic":
            return (mean, None) if self.rng.random() < 0.5 else (None, var)
        if fault == "statistics wrong length":
            return torch.zeros(C + 2, dtype=dtype), torch.ones(C + 2, dtype=dtype)
        if fault == "int statistics":
            return torch.zeros(C, dtype=torch.int64), torch.ones(C, dtype=torch.int64)
        if fault == "statistics share the input" and self.x.is_contiguous() and self.x.numel() >= 2 * C \
                and self.x.dtype == dtype:
            flat = self.x.view(-1)
            return flat[:C], flat[C:2 * C]
        if fault == "statistics share each other":
            return mean, mean
        return mean, var

    def make_args(self):
        x, op, fault = self.x, self.op, self.fault
        C = x.shape[1] if x.dim() > 1 else 1
        pdtype = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) or not x.is_floating_point() \
            else x.dtype
        eps = {"eps 0": 0.0, "eps 1e-30": 1e-30, "eps nan": math.nan, "eps inf": math.inf,
               "eps negative": -1.0}.get(fault, 1e-5)
        if op in STAT_OPS:
            training = self.training = self.rng.random() < 0.7
            rm, rv = self.stats(C, pdtype)
            w, b = self.param("weight", [C], pdtype), self.param("bias", [C], pdtype)
            momentum = {"momentum 0": 0.0, "momentum 1": 1.0, "momentum negative": -0.5, "momentum 2": 2.0,
                        "momentum None": None}.get(fault, 0.1)
            self.desc["training"] = training
            if op in ("batch_norm", "instance_norm"):
                return [x, rm, rv, w, b, training, momentum, eps]
            activation = self.rng.choice([None, "relu", "silu"])
            residual = None
            if fault == "residual broadcast":
                residual = torch.randn(C).to(x.dtype)
            elif fault == "residual other dtype":
                residual = torch.randn(x.shape, dtype=torch.float64)
            elif self.rng.random() < 0.5:
                residual = torch.randn(x.shape, generator=self.generator(5), dtype=torch.float64).to(x.dtype)
            self.desc["activation"] = activation
            return [x, rm, rv, w, b, training, momentum, eps, activation, residual]
        if op in ("layer_norm", "rms_norm"):
            k = min(x.dim(), self.rng.choice([1, 1, 2, 3]))
            shape = list(x.shape[x.dim() - k:])
            if fault == "normalized_shape mismatched":
                shape = [s + 1 for s in shape] or [2]
            elif fault == "normalized_shape empty":
                shape = []
            w = self.param("weight", shape, pdtype)
            if op == "rms_norm":
                return [x, shape, w, None if fault == "eps None" else eps]
            return [x, shape, w, self.param("bias", shape, pdtype), eps]
        if op == "group_norm":
            groups = {"groups 0": 0, "groups not dividing": C + 1}.get(
                fault, self.rng.choice([g for g in range(1, C + 1) if C % g == 0] or [1]))
            self.desc["groups"] = groups
            return [x, groups, self.param("weight", [C], pdtype), self.param("bias", [C], pdtype), eps]
        return [x, self.param("weight", [C], pdtype), self.param("bias", [C], pdtype), eps]


def call(case, library):
    """The op of `case` from `library` ("bn_ext" or "torch") on copies of its
    arguments: (result or exception, the copies after the call)."""
    args = [a.clone() if isinstance(a, torch.Tensor) else a for a in case.args]
    # Statistics that share the input's memory keep sharing in the copy.
    if case.fault == "statistics share the input" and case.args[1] is not None and case.args[1].data_ptr() == \
            case.args[0].data_ptr():
        C = case.args[1].numel()
        args[1], args[2] = args[0].view(-1)[:C], args[0].view(-1)[C:2 * C]
    if case.fault == "statistics share each other" and args[1] is not None:
        args[2] = args[1]
    fn = {
        "bn_ext": {"batch_norm": B.batch_norm, "batch_norm_act": B.batch_norm_act, "layer_norm": B.layer_norm,
                   "rms_norm": B.rms_norm, "group_norm": B.group_norm, "instance_norm": B.instance_norm,
                   "layer_norm_channels": B.layer_norm_channels},
        "torch": {"batch_norm": F.batch_norm, "batch_norm_act": batch_norm_act_twin, "layer_norm": F.layer_norm,
                  "rms_norm": F.rms_norm, "group_norm": F.group_norm, "instance_norm": F.instance_norm,
                  "layer_norm_channels": layer_norm_channels_twin},
    }[library][case.op]
    try:
        return fn(*args), args
    except Exception as error:  # noqa: BLE001 - the type is the verdict
        return error, args


def documented_difference(case, ours, theirs):
    """The README's name for a deliberate difference this case shows, or None
    (README, "Where bn_ext differs from torch")."""
    fault, op = case.fault, case.op
    refused = isinstance(ours, Exception)
    if refused and type(ours) is type(theirs):
        return None
    if isinstance(ours, ValueError) and "eps" in str(ours) and fault in ("eps nan", "eps inf", "eps negative"):
        return "a NaN, infinite (training) or negative eps is refused"
    if isinstance(ours, NotImplementedError) and fault == "int input" and isinstance(theirs, Exception):
        return "integer inputs raise NotImplementedError"
    if isinstance(ours, IndexError) and fault in ("0-d input", "1-d input") and isinstance(theirs, Exception) \
            and op in ("batch_norm", "batch_norm_act", "layer_norm_channels"):
        return "inputs of under 2 dims raise IndexError"
    if not refused and fault == "weight 2-d" and isinstance(theirs, Exception):
        return "per-channel parameters of C elements in any shape"
    if not refused and fault == "zero-size dim" and isinstance(theirs, IndexError) and op in STAT_OPS:
        return "an empty input gives the empty output"
    if isinstance(ours, RuntimeError) and fault == "weight wrong dtype" and op == "rms_norm":
        return "rms_norm's weight has the input's dtype or float32"
    if isinstance(ours, RuntimeError) and "num_groups" in str(ours) and isinstance(theirs, ZeroDivisionError):
        return "num_groups=0 raises RuntimeError"
    if isinstance(ours, RuntimeError) and fault in ("residual broadcast", "residual other dtype"):
        return "batch_norm_act's residual has the input's shape and dtype"
    if isinstance(ours, RuntimeError) and "must not share memory" in str(ours) and case.desc.get("training") \
            and case.fault in ("statistics share the input", "statistics share each other"):
        return "statistics sharing memory are refused in training"
    return None


def agree(ours, theirs, reference, dtype, magnitude=0.0, values=True):
    """bn_ext's result against torch's: the same shape, NaN at the same
    places, and an error against the float64 reference within ERROR_RATIO
    times torch's or 16 roundings of the largest value (or of `magnitude`, the
    largest term the result cancels from). values=False: shapes only."""
    if ours.shape != theirs.shape or ours.dtype != theirs.dtype:
        return f"shape or dtype {tuple(ours.shape)} {ours.dtype} vs {tuple(theirs.shape)} {theirs.dtype}"
    if not values:
        return None
    if not torch.equal(ours.isnan(), theirs.isnan()):
        if not torch.equal(ours.isnan(), reference.isnan()):
            return "NaN at other places than torch's and the float64 reference's"
    finite = reference.double()[reference.isfinite()]
    largest = max(finite.abs().max().item() if finite.numel() else 0.0, magnitude)
    if dtype == torch.float64:  # torch's result is the reference: the suite's float64 tolerance
        limit = 1e-10 * max(1.0, largest) + ERROR_RATIO * max_error(theirs, reference)
    else:
        limit = ERROR_RATIO * max(max_error(theirs, reference), 16 * ROUNDOFF[torch.float32] * largest,
                                  ROUNDOFF[dtype] * largest)
    ours_error = max_error(ours, reference)
    if ours_error > limit:
        return f"error {ours_error:.3g} against float64, torch's {max_error(theirs, reference):.3g}"
    return None


# Where each op's weight and eps are among its arguments.
WEIGHT_AND_EPS = {"batch_norm": (3, 7), "batch_norm_act": (3, 7), "instance_norm": (3, 7), "layer_norm": (2, 4),
                  "rms_norm": (2, 3), "group_norm": (2, 4), "layer_norm_channels": (1, 3)}


def output_magnitude(case):
    """The largest term a normalised output cancels from, |x| |weight| rstd
    with rstd at most 1/sqrt(eps): its rounding bounds the output's, in
    both libraries (a set of little spread far from zero)."""
    weight_at, eps_at = WEIGHT_AND_EPS[case.op]
    x = case.x.detach().double()
    finite = x[x.isfinite()]
    if not finite.numel():
        return 0.0
    weight = case.args[weight_at]
    w = 1.0
    if isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.isfinite().any():
        w = max(1.0, weight.double()[weight.isfinite()].abs().max().item())
    eps = case.args[eps_at]
    eps = torch.finfo(torch.float32).eps if eps is None else eps
    return finite.abs().max().item() * w / math.sqrt(max(eps, 1e-5))


def reference_of(case):
    """torch's op on float64 copies, or None where it cannot run."""
    if not case.x.is_floating_point():
        return None
    saved = case.args
    # Contiguous: torch's channels-first kernels (its channels-last GroupNorm
    # takes E[x^2] - E[x]^2, which keeps no digit of a large mean's variance).
    case.args = [a.double().contiguous() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in saved]
    result, args = call(case, "torch")
    case.args = saved
    return None if isinstance(result, Exception) else (result, args)


def verdict(case):
    before = [a.clone() if isinstance(a, torch.Tensor) else None for a in case.args]
    ours, our_args = call(case, "bn_ext")
    theirs, their_args = call(case, "torch")
    for i, (a, b) in enumerate(zip(case.args, before)):
        if b is not None and not torch.equal(a.nan_to_num(), b.nan_to_num()):
            return "differs", f"argument {i} of the caller changed"
    name = documented_difference(case, ours, theirs)
    if name:
        return "documented", name
    if isinstance(ours, Exception) or isinstance(theirs, Exception):
        if type(ours) is type(theirs):
            return "same", type(ours).__name__
        describe = lambda r: f"{type(r).__name__}: {str(r)[:200]}" if isinstance(r, Exception) else "a result"
        return "differs", f"bn_ext {describe(ours)}; torch {describe(theirs)}"
    reference = reference_of(case)
    dtype = case.x.dtype
    if reference is None:
        return ("same", "result") if torch.equal(ours.nan_to_num(), theirs.nan_to_num()) else (
            "differs", "results of an input without a float64 reference")
    # With eps near 0, a set of no spread normalises to rounding residue
    # times 1/sqrt(eps) in both libraries (NaN or Inf for eps = 0).
    values = case.fault not in ("eps 0", "eps 1e-30")
    problem = agree(ours, theirs, reference[0], dtype, magnitude=output_magnitude(case), values=values)
    if problem:
        return "differs", f"output: {problem}"
    # The running statistics the op updates (arguments 1 and 2).
    if case.op in ("batch_norm", "batch_norm_act", "instance_norm"):
        for i in (1, 2):
            if isinstance(our_args[i], torch.Tensor) and our_args[i].is_floating_point():
                # running_var is kept from rstd = 1/sqrt(var + eps): rounded at the scale of eps.
                eps = case.args[7]
                problem = agree(our_args[i], their_args[i], reference[1][i].to(our_args[i].dtype),
                                our_args[i].dtype, magnitude=abs(eps) if i == 2 else 0.0, values=values)
                if problem:
                    return "differs", f"running statistic {i}: {problem}"
    return "same", "result"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    counts = {"same": 0, "documented": 0, "differs": 0}
    for index in range(args.cases):
        case = Case(rng, args.seed * 1_000_000 + index)
        print(json.dumps({"running": case.desc}), flush=True)
        try:
            kind, why = verdict(case)
        except Exception:  # noqa: BLE001 - a failure of the harness itself is a difference
            kind, why = "differs", "the comparison raised: " + traceback.format_exc(limit=3)
        counts[kind] += 1
        print(json.dumps({"verdict": kind, "why": why, "case": case.desc}), flush=True)
    print(json.dumps({"counts": counts}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

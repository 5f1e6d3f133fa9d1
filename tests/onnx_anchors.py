"""bn_ext.fold_onnx against the BatchNorm folders people use on ONNX files:
onnxoptimizer's fuse_bn_into_conv, onnxruntime's graph optimizer (basic level,
which holds its Conv+BatchNormalization fusion) and onnxscript's rewriter
rules, on the same models. `python tests/onnx_anchors.py` prints the table
(BatchNorms before / left, and the largest error against the original run
with onnxruntime); tests/test_onnx_fold.py asserts bn_ext's row."""

import os
import sys
import tempfile
import warnings

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import bn_ext
from conftest import randomise_batch_norms

FOLDERS = ["bn_ext", "onnxoptimizer", "onnxruntime", "onnxscript"]
WRONG = 1e-4  # relative error above which a folded model is wrong


def _session(model: onnx.ModelProto, level=onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL, save=None):
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = level
    if save:
        options.optimized_model_filepath = save
    return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def fold_with(folder: str, model: onnx.ModelProto) -> onnx.ModelProto:
    if folder == "bn_ext":
        return bn_ext.fold_onnx(model, strict=False)[0]
    if folder == "onnxoptimizer":
        import onnxoptimizer

        return onnxoptimizer.optimize(model, ["fuse_bn_into_conv"])
    if folder == "onnxruntime":
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "optimized.onnx")
            _session(model, onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC, save=path)
            return onnx.load(path)
    if folder == "onnxscript":
        from onnxscript.rewriter import rewrite
        from onnxscript.rewriter.rules.common import (
            fuse_batchnorm_into_conv_rule,
            fuse_batchnorm_into_conv_transpose_rule,
            fuse_batchnorm_into_gemm_rule,
        )

        rules = [fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule, fuse_batchnorm_into_gemm_rule]
        return rewrite(model, pattern_rewrite_rules=rules)
    raise ValueError(folder)


def measure(folder: str, model: onnx.ModelProto, feeds: dict) -> tuple[int, float | str]:
    """(BatchNorms left, largest error relative to the largest output), or the error's name."""
    try:
        folded = fold_with(folder, model)
        want, got = _session(model).run(None, feeds), _session(folded).run(None, feeds)
    except Exception as error:  # noqa: BLE001  (a folder failing is a result)
        return -1, f"fails: {type(error).__name__}"
    left = sum(n.op_type == "BatchNormalization" for n in folded.graph.node)
    scale = max(float(np.abs(w).max()) for w in want)
    return left, max(float(np.abs(g - w).max()) for g, w in zip(got, want)) / scale


def _bn(prefix, channels, rng, x, y):
    values = [rng.uniform(0.5, 1.5, channels), rng.standard_normal(channels), rng.standard_normal(channels),
              rng.uniform(0.5, 2.0, channels)]
    names = [f"{prefix}_{n}" for n in ("scale", "bias", "mean", "var")]
    return (helper.make_node("BatchNormalization", [x, *names], [y], name=prefix),
            [numpy_helper.from_array(v.astype(np.float32), n) for v, n in zip(values, names)])


def _model(nodes, inits, x_shape, y_shape):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("Z", TensorProto.FLOAT, y_shape)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def gemm_case(trans_b, beta, with_c, rng):
    b = rng.standard_normal((6, 5) if trans_b else (5, 6)).astype(np.float32)
    inits = [numpy_helper.from_array(b, "B")]
    inputs = ["X", "B"]
    if with_c:
        inits.append(numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "C"))
        inputs.append("C")
    gemm = helper.make_node("Gemm", inputs, ["Y"], name="gemm", transB=trans_b, beta=beta)
    bn, bn_inits = _bn("bn", 6, rng, "Y", "Z")
    return _model([gemm, bn], inits + bn_inits, (4, 5), (4, 6)), (4, 5)


def matmul_case(rng):
    w = numpy_helper.from_array(rng.standard_normal((5, 6)).astype(np.float32), "W")
    bn, bn_inits = _bn("bn", 6, rng, "Y", "Z")
    return _model([helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm"), bn], [w, *bn_inits], (4, 5), (4, 6)), (4, 5)


def torch_case(module, shape):
    randomise_batch_norms(module)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = os.path.join(tmp, "m.onnx")
        torch.onnx.export(module.eval(), (torch.randn(shape),), path, dynamo=False, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.EVAL, input_names=["X"])
        return onnx.load(path), shape


def cases():
    import timm
    import torchvision

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    return {
        "Conv2d + BN": torch_case(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), (2, 3, 8, 8)),
        "ConvTranspose2d + BN": torch_case(nn.Sequential(nn.ConvTranspose2d(4, 6, 3), nn.BatchNorm2d(6)), (2, 4, 5, 5)),
        "ConvTranspose2d groups=3, in = out + BN": torch_case(
            nn.Sequential(nn.ConvTranspose2d(6, 6, 3, groups=3, stride=2), nn.BatchNorm2d(6)), (2, 6, 5, 5)),
        "ConvTranspose2d groups=2, 4 -> 6 + BN": torch_case(
            nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6)), (2, 4, 5, 5)),
        "Linear + BatchNorm1d (Gemm transB=1)": torch_case(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6)), (4, 5)),
        "Gemm transB=0, beta=2 + BN": gemm_case(0, 2.0, True, rng),
        "Gemm without C + BN": gemm_case(1, 1.0, False, rng),
        "MatMul (2-D, constant weight) + BN": matmul_case(rng),
        "torchvision ResNet-18": torch_case(torchvision.models.resnet18(num_classes=10), (1, 3, 64, 64)),
        "timm EfficientNet-B0": torch_case(timm.create_model("efficientnet_b0", pretrained=False), (1, 3, 64, 64)),
    }


def table() -> list[tuple[str, int, dict]]:
    rows = []
    for name, (model, shape) in cases().items():
        feeds = {"X": np.random.default_rng(5).standard_normal(shape).astype(np.float32)}
        before = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
        rows.append((name, before, {folder: measure(folder, model, feeds) for folder in FOLDERS}))
    return rows


def cell(result) -> str:
    left, error = result
    if isinstance(error, str):
        return error
    return f"{left} left, {error:.1e}" + (" **wrong**" if error > WRONG else "")


def main() -> int:
    rows = table()
    print("| model | BatchNorms | " + " | ".join(FOLDERS) + " |")
    print("|---|---|" + "---|" * len(FOLDERS))
    for name, before, results in rows:
        print(f"| {name} | {before} | " + " | ".join(cell(results[f]) for f in FOLDERS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

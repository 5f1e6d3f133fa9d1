"""BatchNormalization folding in ONNX files (bn_ext.fold_onnx and the fold
command): exported torch and timm models, Gemm in every transA/transB/alpha/
beta form, 2-D MatMul, grouped ConvTranspose, shared initializers, outputs
with other readers; every result checked by onnx.checker and against the
original with onnxruntime."""

import copy
import subprocess
import sys
import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import timm
import torch
import torchvision
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import bn_ext
from conftest import randomise_batch_norms


def export(model, x, path, constant_folding=False):
    """The TorchScript exporter in eval mode: the BatchNormalization nodes stay."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=False, do_constant_folding=constant_folding,
                          training=torch.onnx.TrainingMode.EVAL)
    return onnx.load(path)


def run(model, feeds):
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_same_outputs(folded, original, feeds):
    for a, e in zip(run(folded, feeds), run(original, feeds)):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(e).max())))


def op_types(model):
    return [n.op_type for n in model.graph.node]


TORCH_CASES = {
    "conv-relu-linear-bn1d": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                                    nn.Linear(8 * 6 * 6, 5), nn.BatchNorm1d(5)), (2, 3, 8, 8)),
    "conv-transpose-groups-in-eq-out": (lambda: nn.Sequential(nn.ConvTranspose2d(6, 6, 3, groups=3, stride=2),
                                                              nn.BatchNorm2d(6)), (2, 6, 5, 5)),
    "conv-transpose-groups": (lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2), nn.BatchNorm2d(6)),
                              (2, 4, 5, 5)),
    "conv-transpose-3d": (lambda: nn.Sequential(nn.ConvTranspose3d(3, 4, 2), nn.BatchNorm3d(4)), (1, 3, 3, 3, 3)),
    "depthwise-conv1d": (lambda: nn.Sequential(nn.Conv1d(4, 4, 3, groups=4, bias=False), nn.BatchNorm1d(4)),
                         (2, 4, 9)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (1, 3, 64, 64)),
    "timm-efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", pretrained=False), (1, 3, 64, 64)),
}


@pytest.mark.parametrize("name", list(TORCH_CASES))
def test_exported_models_fold_completely(name, tmp_path):
    factory, shape = TORCH_CASES[name]
    torch.manual_seed(0)
    model = randomise_batch_norms(factory())
    original = export(model, torch.randn(shape), tmp_path / "model.onnx")
    before = original.SerializeToString()
    folded, report = bn_ext.fold_onnx(original)
    assert original.SerializeToString() == before  # the caller's model is not changed
    assert report.batch_norms_before == op_types(original).count("BatchNormalization") > 0
    assert report.batch_norms_after == 0 and "BatchNormalization" not in op_types(folded), str(report)
    assert report.passed, str(report)
    onnx.checker.check_model(folded, full_check=True)
    feeds = {original.graph.input[0].name: np.random.default_rng(3).standard_normal(shape).astype(np.float32)}
    assert_same_outputs(folded, original, feeds)


def bn_nodes(prefix, channels, rng, input_name, output_name):
    """A BatchNormalization with random constants: (node, initializers)."""
    values = [rng.uniform(0.5, 1.5, channels), rng.standard_normal(channels), rng.standard_normal(channels),
              rng.uniform(0.5, 2.0, channels)]
    names = [f"{prefix}_{n}" for n in ("scale", "bias", "mean", "var")]
    inits = [numpy_helper.from_array(v.astype(np.float32), n) for v, n in zip(values, names)]
    return helper.make_node("BatchNormalization", [input_name, *names], [output_name], name=prefix, epsilon=1e-3), inits


def graph_model(nodes, inits, inputs, outputs):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0), (1.5, 0.0)])
@pytest.mark.parametrize("c_shape", [None, (6,), (1, 6), (4, 6), ()], ids=str)
def test_gemm_in_every_form_folds(trans_a, trans_b, alpha, beta, c_shape):
    rng = np.random.default_rng(0)
    a_shape = (5, 4) if trans_a else (4, 5)
    b = rng.standard_normal((6, 5) if trans_b else (5, 6)).astype(np.float32)
    inits = [numpy_helper.from_array(b, "B")]
    gemm_inputs = ["A", "B"]
    if c_shape is not None:
        inits.append(numpy_helper.from_array(rng.standard_normal(c_shape).astype(np.float32), "C"))
        gemm_inputs.append("C")
    gemm = helper.make_node("Gemm", gemm_inputs, ["Y"], name="gemm", transA=trans_a, transB=trans_b, alpha=alpha,
                            beta=beta)
    bn, bn_inits = bn_nodes("bn", 6, rng, "Y", "Z")
    model = graph_model([gemm, bn], inits + bn_inits, [helper.make_tensor_value_info("A", TensorProto.FLOAT, a_shape)],
                        [helper.make_tensor_value_info("Z", TensorProto.FLOAT, (4, 6))])
    folded, report = bn_ext.fold_onnx(model)
    assert report.folded == [("bn", "gemm", "after")] and op_types(folded) == ["Gemm"], str(report)
    feeds = {"A": rng.standard_normal(a_shape).astype(np.float32)}
    assert_same_outputs(folded, model, feeds)


def matmul_model(rank, rng):
    shape = (4, 5) if rank == 2 else (4, 6, 5)
    w = numpy_helper.from_array(rng.standard_normal((5, 6)).astype(np.float32), "W")
    matmul = helper.make_node("MatMul", ["X", "W"], ["Y"], name="matmul")
    channels = 6 if rank == 2 else shape[1]
    bn, bn_inits = bn_nodes("bn", channels, rng, "Y", "Z")
    out_shape = (4, 6) if rank == 2 else (4, 6, 6)
    return graph_model([matmul, bn], [w, *bn_inits], [helper.make_tensor_value_info("X", TensorProto.FLOAT, shape)],
                       [helper.make_tensor_value_info("Z", TensorProto.FLOAT, out_shape)]), shape


def test_two_dim_matmul_with_a_constant_weight_folds_into_a_gemm():
    rng = np.random.default_rng(1)
    model, shape = matmul_model(2, rng)
    folded, report = bn_ext.fold_onnx(model)
    assert op_types(folded) == ["Gemm"] and report.batch_norms_after == 0
    assert_same_outputs(folded, model, {"X": rng.standard_normal(shape).astype(np.float32)})


def test_three_dim_matmul_is_left_with_the_reason():
    # BatchNormalization of (N, T, F) normalises T; the weight maps F.
    model, _ = matmul_model(3, np.random.default_rng(2))
    folded, report = bn_ext.fold_onnx(model)
    assert report.folded == [] and "is not 2-D" in dict(report.left)["bn"]
    assert op_types(folded) == op_types(model)


def conv_node(name, weight, x, y, bias=None):
    return helper.make_node("Conv", [x, weight] + ([bias] if bias else []), [y], name=name, kernel_shape=[3, 3])


def test_a_shared_weight_is_copied_not_changed():
    # Two Convs read one weight, each followed by its own BatchNorm: both
    # fold, each into its own copy.
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")]
    bn1, i1 = bn_nodes("bn1", 4, rng, "c1", "y1")
    bn2, i2 = bn_nodes("bn2", 4, rng, "c2", "y2")
    nodes = [conv_node("conv1", "W", "X", "c1", "b"), conv_node("conv2", "W", "X", "c2", "b"), bn1, bn2]
    out = [helper.make_tensor_value_info(n, TensorProto.FLOAT, (1, 4, 4, 4)) for n in ("y1", "y2")]
    model = graph_model(nodes, inits + i1 + i2, [helper.make_tensor_value_info("X", TensorProto.FLOAT, (1, 3, 6, 6))],
                        out)
    folded, report = bn_ext.fold_onnx(model)
    assert report.batch_norms_after == 0
    weights = [n.input[1] for n in folded.graph.node]
    assert len(set(weights)) == 2 and "W" not in weights
    assert_same_outputs(folded, model, {"X": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)})


def test_a_conv_output_with_other_readers_is_left():
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W")]
    bn, bn_inits = bn_nodes("bn", 4, rng, "c", "y")
    add = helper.make_node("Add", ["y", "c"], ["z"], name="residual")
    model = graph_model([conv_node("conv", "W", "X", "c"), bn, add], inits + bn_inits,
                        [helper.make_tensor_value_info("X", TensorProto.FLOAT, (1, 3, 6, 6))],
                        [helper.make_tensor_value_info("z", TensorProto.FLOAT, (1, 4, 4, 4))])
    folded, report = bn_ext.fold_onnx(model)
    assert report.folded == [] and "also read by 1 other" in dict(report.left)["bn"]
    assert_same_outputs(folded, model, {"X": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)})


def training_mode_model():
    rng = np.random.default_rng(6)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W")]
    bn, bn_inits = bn_nodes("bn", 4, rng, "c", "y")
    bn.output.extend(["running_mean", "running_var"])
    bn.attribute.append(helper.make_attribute("training_mode", 1))
    return graph_model([conv_node("conv", "W", "X", "c"), bn], inits + bn_inits,
                       [helper.make_tensor_value_info("X", TensorProto.FLOAT, (2, 3, 6, 6))],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, (2, 4, 4, 4))])


def test_a_training_mode_batch_norm_is_left():
    _, report = bn_ext.fold_onnx(training_mode_model())
    assert report.folded == [] and "training mode" in dict(report.left)["bn"]


def test_fold_command_refuses_an_onnx_model_in_training_mode(tmp_path):
    path = tmp_path / "train.onnx"
    onnx.save(training_mode_model(), path)
    done = subprocess.run([sys.executable, "-m", "bn_ext", "fold", str(path), "-o", str(tmp_path / "out.onnx")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "BatchNormalization nodes in training mode" in done.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_fold_command_on_an_onnx_file(tmp_path):
    torch.manual_seed(0)
    model = randomise_batch_norms(torchvision.models.resnet18(num_classes=10))
    path = tmp_path / "model.onnx"
    export(model, torch.randn(1, 3, 32, 32), path)
    before = path.read_bytes()
    out = tmp_path / "folded.onnx"
    done = subprocess.run([sys.executable, "-m", "bn_ext", "fold", str(path), "-o", str(out), "--check"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "20 before, 0 left" in done.stdout
    assert "BatchNormalization" not in op_types(onnx.load(out)) and path.read_bytes() == before
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage")
    done = subprocess.run([sys.executable, "-m", "bn_ext", "fold", str(corrupt), "-o", str(tmp_path / "x.onnx")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "input: not a valid ONNX model" in done.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_the_input_model_object_is_never_changed():
    model, _ = matmul_model(2, np.random.default_rng(7))
    snapshot = copy.deepcopy(model)
    bn_ext.fold_onnx(model)
    assert model == snapshot


def test_every_case_of_the_comparison_table_folds_exactly():
    # tests/onnx_anchors.py: the cases where onnxoptimizer, onnxruntime or
    # onnxscript leave BatchNorms (ConvTranspose, Gemm, MatMul) among them.
    from onnx_anchors import cases, measure

    for name, (model, shape) in cases().items():
        feeds = {"X": np.random.default_rng(5).standard_normal(shape).astype(np.float32)}
        left, error = measure("bn_ext", model, feeds)
        assert left == 0 and error < 1e-5, (name, left, error)


# --- a BatchNorm ahead of the layer that alone reads it -----------------------


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta,with_c", [(1.0, 1.0, True), (0.5, 2.0, True), (2.0, 1.0, False)])
def test_batch_norm_ahead_of_a_gemm_folds(trans_b, alpha, beta, with_c):
    rng = np.random.default_rng(10)
    bn, bn_inits = bn_nodes("bn", 5, rng, "X", "A")
    inits = [numpy_helper.from_array(rng.standard_normal((6, 5) if trans_b else (5, 6)).astype(np.float32), "B")]
    inputs = ["A", "B"]
    if with_c:
        inits.append(numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "C"))
        inputs.append("C")
    gemm = helper.make_node("Gemm", inputs, ["Z"], name="gemm", transB=trans_b, alpha=alpha, beta=beta)
    model = graph_model([bn, gemm], bn_inits + inits, [helper.make_tensor_value_info("X", TensorProto.FLOAT, (4, 5))],
                        [helper.make_tensor_value_info("Z", TensorProto.FLOAT, (4, 6))])
    folded, report = bn_ext.fold_onnx(model)
    assert report.folded == [("bn", "gemm", "before")] and op_types(folded) == ["Gemm"], str(report)
    assert_same_outputs(folded, model, {"X": rng.standard_normal((4, 5)).astype(np.float32)})


def test_batch_norm_ahead_of_a_matmul_folds_into_a_gemm():
    rng = np.random.default_rng(11)
    bn, bn_inits = bn_nodes("bn", 5, rng, "X", "A")
    w = numpy_helper.from_array(rng.standard_normal((5, 6)).astype(np.float32), "W")
    model = graph_model([bn, helper.make_node("MatMul", ["A", "W"], ["Z"], name="mm")], [*bn_inits, w],
                        [helper.make_tensor_value_info("X", TensorProto.FLOAT, (4, 5))],
                        [helper.make_tensor_value_info("Z", TensorProto.FLOAT, (4, 6))])
    folded, report = bn_ext.fold_onnx(model)
    assert report.folded == [("bn", "mm", "before")] and op_types(folded) == ["Gemm"]
    assert_same_outputs(folded, model, {"X": rng.standard_normal((4, 5)).astype(np.float32)})


@pytest.mark.parametrize("groups,pads,folds", [(1, [0, 0, 0, 0], True), (2, [0, 0, 0, 0], True),
                                              (1, [1, 1, 1, 1], False)])
def test_batch_norm_ahead_of_a_conv_folds_only_without_zero_padding(groups, pads, folds):
    rng = np.random.default_rng(12)
    bn, bn_inits = bn_nodes("bn", 4, rng, "X", "A")
    w = numpy_helper.from_array(rng.standard_normal((6, 4 // groups, 3, 3)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b")
    conv = helper.make_node("Conv", ["A", "W", "b"], ["Z"], name="conv", kernel_shape=[3, 3], group=groups, pads=pads)
    out = 6 if not any(pads) else 8
    model = graph_model([bn, conv], [*bn_inits, w, b], [helper.make_tensor_value_info("X", TensorProto.FLOAT,
                                                                                         (2, 4, 8, 8))],
                        [helper.make_tensor_value_info("Z", TensorProto.FLOAT, (2, 6, out, out))])
    folded, report = bn_ext.fold_onnx(model)
    if folds:
        assert report.folded == [("bn", "conv", "before")] and op_types(folded) == ["Conv"]
    else:
        assert report.folded == [] and "precedes zero-padded Conv" in dict(report.left)["bn"]
    assert_same_outputs(folded, model, {"X": rng.standard_normal((2, 4, 8, 8)).astype(np.float32)})


def test_batch_norm_ahead_of_a_conv_transpose_is_left():
    rng = np.random.default_rng(13)
    bn, bn_inits = bn_nodes("bn", 4, rng, "X", "A")
    w = numpy_helper.from_array(rng.standard_normal((4, 6, 3, 3)).astype(np.float32), "W")
    deconv = helper.make_node("ConvTranspose", ["A", "W"], ["Z"], name="deconv", kernel_shape=[3, 3])
    model = graph_model([bn, deconv], [*bn_inits, w], [helper.make_tensor_value_info("X", TensorProto.FLOAT,
                                                                                      (2, 4, 5, 5))],
                        [helper.make_tensor_value_info("Z", TensorProto.FLOAT, (2, 6, 7, 7))])
    _, report = bn_ext.fold_onnx(model)
    assert report.folded == [] and "border outputs see fewer taps" in dict(report.left)["bn"]


def test_batch_norm_through_a_flatten_into_a_gemm_folds(tmp_path):
    torch.manual_seed(0)
    model = randomise_batch_norms(nn.Sequential(nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 3 * 3, 5)))
    original = export(model, torch.randn(2, 4, 3, 3), tmp_path / "m.onnx")
    assert op_types(original) == ["BatchNormalization", "Flatten", "Gemm"]
    folded, report = bn_ext.fold_onnx(original)
    assert report.batch_norms_after == 0 and report.folded[0][2] == "before", str(report)
    assert op_types(folded) == ["Flatten", "Gemm"]
    assert_same_outputs(folded, original, {original.graph.input[0].name:
                                           np.random.default_rng(1).standard_normal((2, 4, 3, 3)).astype(np.float32)})


@pytest.mark.parametrize("target,folds", [((2, 36), True), ((2, 9, 4), False), ((8, 9), False)], ids=str)
def test_batch_norm_through_a_reshape_folds_only_where_channels_stay_grouped(target, folds):
    # (2, 4, 3, 3) -> (2, 36): channel c is features [9c, 9c + 9); other
    # reshapes mix channels into the rows or the batch.
    rng = np.random.default_rng(14)
    bn, bn_inits = bn_nodes("bn", 4, rng, "X", "A")
    shape = numpy_helper.from_array(np.array(target, dtype=np.int64), "shape")
    w = numpy_helper.from_array(rng.standard_normal((target[-1], 5)).astype(np.float32), "W")
    nodes = [bn, helper.make_node("Reshape", ["A", "shape"], ["R"], name="reshape"),
             helper.make_node("MatMul", ["R", "W"], ["Z"], name="mm")]
    model = graph_model(nodes, [*bn_inits, shape, w],
                        [helper.make_tensor_value_info("X", TensorProto.FLOAT, (2, 4, 3, 3))],
                        [helper.make_tensor_value_info("Z", TensorProto.FLOAT, (*target[:-1], 5))])
    folded, report = bn_ext.fold_onnx(model)
    assert (report.batch_norms_after == 0) == folds, str(report)
    if not folds:
        assert "do not provably keep channels" in dict(report.left)["bn"]
    assert_same_outputs(folded, model, {"X": rng.standard_normal((2, 4, 3, 3)).astype(np.float32)})


class BatchNormThenTransposedLinear(nn.Module):
    """BatchNorm1d over (N, C, L), then (N, L, C) into a Linear: the channels
    reach the Linear's features through a Transpose."""

    def __init__(self):
        super().__init__()
        self.bn, self.fc = nn.BatchNorm1d(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.bn(x).transpose(1, 2))


@pytest.mark.parametrize("perm,folds", [([0, 2, 1], True), ([2, 0, 1], True), ([1, 0, 2], False)])
def test_batch_norm_through_a_transpose_into_a_matmul(perm, folds):
    # perm [1, 0, 2] leaves the channels on axis 0, not the features MatMul reads.
    rng = np.random.default_rng(15)
    bn, bn_inits = bn_nodes("bn", 6, rng, "X", "A")
    transposed = [(2, 6, 4)[i] for i in perm]
    w = numpy_helper.from_array(rng.standard_normal((transposed[-1], 3)).astype(np.float32), "W")
    nodes = [bn, helper.make_node("Transpose", ["A"], ["T"], name="transpose", perm=perm),
             helper.make_node("MatMul", ["T", "W"], ["Z"], name="mm")]
    model = graph_model(nodes, [*bn_inits, w], [helper.make_tensor_value_info("X", TensorProto.FLOAT, (2, 6, 4))],
                        [helper.make_tensor_value_info("Z", TensorProto.FLOAT, (*transposed[:-1], 3))])
    folded, report = bn_ext.fold_onnx(model)
    assert (report.batch_norms_after == 0) == folds, str(report)
    assert_same_outputs(folded, model, {"X": rng.standard_normal((2, 6, 4)).astype(np.float32)})


def test_an_exported_batch_norm_then_transpose_then_linear_folds(tmp_path):
    torch.manual_seed(0)
    model = randomise_batch_norms(BatchNormThenTransposedLinear())
    # With constant folding the Linear's transposed weight is a constant.
    original = export(model, torch.randn(2, 6, 4), tmp_path / "m.onnx", constant_folding=True)
    assert op_types(original) == ["BatchNormalization", "Transpose", "MatMul", "Add"]
    folded, report = bn_ext.fold_onnx(original)
    assert report.batch_norms_after == 0, str(report)
    assert_same_outputs(folded, original, {original.graph.input[0].name:
                                           np.random.default_rng(2).standard_normal((2, 6, 4)).astype(np.float32)})


def test_constants_shared_through_identity_nodes_fold(tmp_path):
    # Fresh statistics (means 0, variances 1) are equal initializers: the
    # TorchScript exporter without constant folding keeps one of each and
    # reads it through Identity nodes. They are constants all the same.
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    original = export(model, torch.randn(1, 3, 64, 64), tmp_path / "model.onnx")
    assert "Identity" in op_types(original)
    folded, report = bn_ext.fold_onnx(original)
    assert report.batch_norms_before == 20 and report.batch_norms_after == 0, str(report)
    assert report.passed and "Identity" not in op_types(folded)
    onnx.checker.check_model(folded, full_check=True)
    feeds = {original.graph.input[0].name: np.random.default_rng(5).standard_normal((1, 3, 64, 64)).astype(np.float32)}
    assert_same_outputs(folded, original, feeds)


def test_constants_through_cast_and_identity_fold():
    # A half-precision weight cast to float, and BatchNorm constants read
    # through Identity and Constant nodes.
    rng = np.random.default_rng(6)
    weight = rng.standard_normal((4, 3, 3, 3)).astype(np.float16)
    bn, inits = bn_nodes("bn", 4, rng, "c", "Y")
    scale = inits[0]
    inits = [numpy_helper.from_array(weight, "W16")] + inits[1:]
    nodes = [helper.make_node("Cast", ["W16"], ["W"], to=TensorProto.FLOAT),
             helper.make_node("Constant", [], ["scale_c"], value=scale),
             helper.make_node("Identity", ["scale_c"], ["scale"]),
             conv_node("conv", "W", "X", "c"), bn]
    bn.input[1] = "scale"
    model = graph_model(nodes, inits, [helper.make_tensor_value_info("X", TensorProto.FLOAT, (1, 3, 6, 6))],
                        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, (1, 4, 4, 4))])
    folded, report = bn_ext.fold_onnx(model)
    assert report.batch_norms_after == 0 and report.passed, str(report)
    assert op_types(folded) == ["Conv"]
    assert_same_outputs(folded, model, {"X": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)})


def test_the_census_counts_onnx_norms_that_do_not_fold():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 8])
    scale = numpy_helper.from_array(np.linspace(0.5, 1.5, 8).astype(np.float32), "scale")
    bias = numpy_helper.from_array(np.zeros(8, np.float32), "bias")
    node = helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["y"], axis=-1)
    model = helper.make_model(helper.make_graph([node], "ln", [x], [y], [scale, bias]),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    _, report = bn_ext.fold_onnx(model)
    assert report.norms == {"LayerNormalization": 1} and report.batch_norms_before == 0, str(report)
    assert "nothing folded: the model holds no BatchNorm; its norms compute statistics" in str(report)

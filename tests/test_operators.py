"""The operator contract beyond opcheck (test_op_samples.py): torch.compile
(fullgraph) with no graph break, torch.export, and the direct bindings."""

import pytest
import torch

import bn_ext


def conv_bn_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), bn_ext.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 3), bn_ext.nn.BatchNorm2d(4, momentum=None), torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 5), bn_ext.nn.BatchNorm1d(5),
    )


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_matches_eager(training):
    eager = conv_bn_net().train(training)
    compiled_model = conv_bn_net().train(training)
    compiled = torch.compile(compiled_model, fullgraph=True)
    for step in range(2):
        x = torch.randn(4, 3, 8, 8, requires_grad=True)
        out_e = eager(x)
        out_c = compiled(x)
        torch.testing.assert_close(out_c, out_e)
        (ge,) = torch.autograd.grad(out_e.square().sum(), x)
        (gc,) = torch.autograd.grad(out_c.square().sum(), x)
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(eager.state_dict().items(), compiled_model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_compile_has_no_graph_break():
    explanation = torch._dynamo.explain(conv_bn_net().train())(torch.randn(4, 3, 8, 8))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_export_runs_and_matches(training):
    model = conv_bn_net().train(training)
    x = torch.randn(4, 3, 8, 8)
    program = torch.export.export(model, (x,))
    names = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "bn_ext.batch_norm.default" in names  # the composite operator, kept whole
    decomposed = program.run_decompositions()
    names = {str(n.target) for n in decomposed.graph.nodes if n.op == "call_function"}
    assert "bn_ext.batch_norm_forward.default" in names and "bn_ext.batch_norm.default" not in names
    for exported in (program, decomposed):
        reference = conv_bn_net().train(training)
        torch.testing.assert_close(exported.module()(x), reference(x))


class TinyTransformerBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.ln = bn_ext.nn.LayerNorm(16)
        self.rms = bn_ext.nn.RMSNorm(16)
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x):
        h = x + self.fc2(torch.relu(self.fc1(self.ln(x))))
        return self.rms(h)


def test_compile_fullgraph_row_norms_match_eager():
    model = TinyTransformerBlock()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 5, 16, requires_grad=True)
    torch.testing.assert_close(compiled(x), model(x))
    (g_c,) = torch.autograd.grad(compiled(x).sum(), x)
    (g_e,) = torch.autograd.grad(model(x).sum(), x)
    torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-5)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0


def test_export_row_norms():
    model = TinyTransformerBlock()
    x = torch.randn(3, 5, 16)
    program = torch.export.export(model, (x,))
    names = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"bn_ext.layer_norm_forward.default", "bn_ext.rms_norm_forward.default"} <= names
    torch.testing.assert_close(program.module()(x), model(x))


@pytest.mark.parametrize("x", [torch.randn(6, 3, 4, 5), torch.randn(6, 3, 4, 5).to(memory_format=torch.channels_last),
                               torch.randn(5, 4, dtype=torch.bfloat16)], ids=["nchw", "channels_last", "bf16-2d"])
# --- the direct bindings (bn_ext._C) that eager calls use instead of torch.ops ---


def _through_torch_ops():
    """A __torch_function__ mode: while active, bn_ext's functions call torch.ops."""

    class Recorder(torch.overrides.TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.calls.append(func)
            return func(*args, **(kwargs or {}))

    return Recorder()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_direct_batch_norm_module_matches_the_operator_path(momentum):
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, 5, requires_grad=True)
    direct, via_ops = bn_ext.nn.BatchNorm2d(4, momentum=momentum), bn_ext.nn.BatchNorm2d(4, momentum=momentum)
    for _ in range(2):
        y_direct = direct(x)
        with _through_torch_ops() as mode:
            y_ops = via_ops(x)
        assert torch.ops.bn_ext.batch_norm.default in mode.calls
        assert torch.equal(y_direct, y_ops)
    (g_direct,) = torch.autograd.grad(y_direct.sum(), x)
    (g_ops,) = torch.autograd.grad(y_ops.sum(), x)
    assert torch.equal(g_direct, g_ops)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(direct, name), getattr(via_ops, name)), name
    assert direct.num_batches_tracked.item() == 2


def test_direct_row_norms_match_the_operator_path():
    torch.manual_seed(1)
    x = torch.randn(3, 7, 10, requires_grad=True)
    w, b = torch.randn(10), torch.randn(10)
    for fn in (lambda: bn_ext.layer_norm(x, (10,), w, b), lambda: bn_ext.layer_norm(x, [7, 10]),
               lambda: bn_ext.rms_norm(x, 10, w), lambda: bn_ext.rms_norm(x, (10,), w, 1e-3)):
        direct = fn()
        with _through_torch_ops() as mode:
            via_ops = fn()
        assert any(str(f).startswith("bn_ext.") for f in mode.calls), mode.calls
        assert torch.equal(direct, via_ops)
        assert direct.grad_fn is not None


def test_direct_bindings_raise_torch_errors():
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(RuntimeError, match="weight should contain 3 elements"):
        bn_ext.batch_norm(x, None, None, torch.ones(4), training=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn_ext.batch_norm(torch.randn(1, 3), None, None, training=True)
    with pytest.raises(RuntimeError, match="expected input with shape"):
        bn_ext.layer_norm(x, (3,))
    with pytest.raises(TypeError, match="weight must be a Tensor"):
        bn_ext.layer_norm(x, (2,), weight=[1.0, 2.0])
    with pytest.raises(TypeError, match="normalized_shape must be a sequence of ints"):
        bn_ext.rms_norm(x, ("a",))

"""Exports a model that keeps bn_ext operators (an unfolded eval BatchNorm, a
LayerNorm, an RMSNorm) with torch.export, compiles it with AOTInductor into
OUT/model.pt2, and saves an input and the Python result beside it
(OUT/io.pt) for aoti_test.cpp, which runs the package from C++ alone."""

import sys
from pathlib import Path

import torch
from torch import nn

import bn_ext


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = bn_ext.nn.BatchNorm2d(8)
        self.ln = bn_ext.nn.LayerNorm(8)
        self.rms = bn_ext.nn.RMSNorm(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x))).permute(0, 2, 3, 1)
        return self.fc(self.rms(self.ln(y))).mean((1, 2))


def main(out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        model.bn.running_mean.normal_()
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
        model.ln.weight.uniform_(0.5, 1.5)
    model.eval()
    x = torch.randn(2, 3, 10, 12)
    program = torch.export.export(model, (x,))
    kept = {str(node.target) for node in program.graph.nodes if "bn_ext" in str(node.target)}
    # bn_ext.batch_norm is composed of others: AOTInductor decomposes it into
    # the forward operator, which the package calls.
    assert {"bn_ext.batch_norm.default", "bn_ext.layer_norm_forward.default",
            "bn_ext.rms_norm_forward.default"} <= kept, kept
    torch._inductor.aoti_compile_and_package(program, package_path=str(out / "model.pt2"))
    with torch.no_grad():
        expected = model(x)
    torch.save([x, expected], out / "io.pt")
    print(f"wrote {out / 'model.pt2'} with {sorted(kept)}")


if __name__ == "__main__":
    main(sys.argv[1])

"""The mirai torch vignette, step by step, in Python.

R's mirai vignette "Serialization: torch" (seed/mirai-torch-vignette.txt) shows a torch
model and an optimizer built on a daemon and returned to the host as seamlessly as any
other object.  In asyncmirai ``torch.Tensor`` is in the default codec table, so no
configuration is needed; the vignette's ``serial_config`` step is kept here anyway to
show how a custom codec is registered (it uses torch's own serialization, like the R
original, and is vectorized: all tensors of a message go through one ``torch.save``).

Run:  python examples/torch_model.py
"""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F
from torch import nn

import asyncmirai as am


# -- the vignette's serial_config(class = "torch_tensor", sfunc = torch_serialize,
#    ufunc = torch_load, vec = TRUE) ------------------------------------------------
def torch_serialize(tensors: list[torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return buf.getbuffer()


def torch_load(data: memoryview) -> list[torch.Tensor]:
    return torch.load(io.BytesIO(data), weights_only=True)


# -- the model: defined here, in __main__; cloudpickle ships the class by value ------
# As in the vignette both convolutions take ``in_size`` channels (so 2 x 520 = 1,040
# parameters); forward() therefore only runs with in_size == out_size, and the vignette
# never calls it.
class Model(nn.Module):
    def __init__(self, in_size: int, out_size: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_size, out_size, 5)
        self.conv2 = nn.Conv2d(in_size, out_size, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        return F.relu(self.conv2(x))


def build(model: type[nn.Module], params: dict[str, int]) -> nn.Module:
    torch.manual_seed(42)  # deterministic weights, so the output can be tested
    return model(**params)


def main() -> None:
    torch.set_printoptions(precision=4, sci_mode=False)

    # daemons(1)
    print(">>> am.daemons(1, serial=cfg)")
    cfg = am.serial_config(torch.Tensor, torch_serialize, torch_load, vec=True)
    print(int(am.daemons(1, serial=cfg)))

    # everywhere(library(torch), .serial = cfg)
    print('>>> am.everywhere("import torch", _serial=cfg)')
    am.everywhere("import torch", _serial=cfg).result()
    print("ok")

    # m <- mirai(do.call(model, params), model = model, params = params)
    print(">>> m = am.mirai(build, Model, params)")
    params = {"in_size": 1, "out_size": 20}
    m = am.mirai(build, Model, params)
    model = m.result()
    print(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"An nn.Module containing {n_params:,} parameters.")
    for name, child in model.named_children():
        n_child = sum(p.numel() for p in child.parameters())
        print(f"  {name}: {type(child).__name__} #{n_child} parameters")

    # m$data$parameters$conv1.weight
    print(">>> model.conv1.weight")
    w = model.conv1.weight
    print(w.detach()[:2])
    print(f"[ {w.type()}{{{','.join(map(str, w.shape))}}} ][ requires_grad = {w.requires_grad} ]")
    print(f"type: {type(w).__name__}, is_leaf: {w.is_leaf}")

    # optim <- mirai(optim_rmsprop(params = params), params = m$data$parameters)
    print(">>> optim = am.mirai(torch.optim.RMSprop, list(model.parameters()))")
    optim = am.mirai(torch.optim.RMSprop, list(model.parameters())).result()
    print(optim)
    print("param shapes:", [tuple(p.shape) for p in optim.param_groups[0]["params"]])

    # the host's copies are ordinary, trainable tensors
    model.conv1(torch.randn(1, 1, 28, 28)).sum().backward()
    print("backward through conv1 on the host: grad shape", tuple(model.conv1.weight.grad.shape))

    # daemons(0)
    print(">>> am.daemons(0)")
    print(am.daemons(0))


if __name__ == "__main__":
    main()

"""The serial engine: one device, the x̃-pass then the y-pass. Same math as
every other engine and no speed-up; the baseline and the CPU path."""
from __future__ import annotations

import contextlib

import torch


def check_one_device(opt, engine: str) -> torch.device:
    devices = {b.x.device for b in opt._bufs}
    if len(devices) != 1:
        raise ValueError(f"the {engine} engine runs on one device, but the parameters are on "
                         f"{sorted(map(str, devices))}; move the model to one device")
    return devices.pop()


class SerialEngine:
    name = "serial"

    def __init__(self, opt):
        self.opt = opt
        self.device = check_one_device(opt, self.name)

    def sampa_gradients(self, held, batch):
        opt = self.opt
        for b in opt._bufs:
            b.g.zero_()
            b.gy_new.zero_()
        loss_x = opt._forward_backward(opt.model, held, "x̃-pass")
        ymodel = opt._ymodel
        if ymodel.training != opt.model.training:
            ymodel.train(opt.model.training)
        with opt._user_params_frozen() if opt._t == 0 else contextlib.nullcontext():
            loss_y = opt._forward_backward(ymodel, batch, "y-pass")
        return loss_x, loss_y

    def gradient(self, batch, which: str):
        opt = self.opt
        for b in opt._bufs:
            b.g.zero_()
        return opt._forward_backward(opt.model, batch, which)

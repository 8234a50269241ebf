"""The serial engine: one device, the x̃-pass then the y-pass. Same math as
every other engine and no speed-up; the baseline and the CPU path."""
from __future__ import annotations

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
        if opt._t == 0:
            loss_y = self._first_y_pass(batch)
        else:
            loss_y = opt._forward_backward(ymodel, batch, "y-pass")
        return loss_x, loss_y

    def _first_y_pass(self, batch):
        # Once: a loss_fn that ignores its model argument would silently take
        # the y-gradient at xt. With the user's parameters frozen, such a loss
        # fails the requires_grad check in opt._loss with a clear message.
        opt = self.opt
        flags = [p.requires_grad for p in opt._params]
        try:
            for p in opt._params:
                p.requires_grad_(False)
            return opt._forward_backward(opt._ymodel, batch, "y-pass")
        finally:
            for p, f in zip(opt._params, flags):
                p.requires_grad_(f)

    def gradient(self, batch, which: str):
        opt = self.opt
        for b in opt._bufs:
            b.g.zero_()
        return opt._forward_backward(opt.model, batch, which)

"""x-prediction (pMF) as a wrapper any backbone can use: the net predicts the clean sample x_hat,
the wrapper returns velocities u = (z - x_hat) / clip(t, T_CLIP, 1) (v the same way)."""
import dataclasses

import torch

from fastmf.models.contract import Backbone, Conditions, Prediction, Tangent

T_CLIP = 0.05  # pMF's lower clip of t in the x -> velocity conversion (and in its v_t target)


def clipped_t(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """clip(t, T_CLIP, 1) as (B, 1, ..., 1) to broadcast against like (B, C, *S)."""
    return t.clamp(T_CLIP, 1.0).reshape(-1, *[1] * (like.dim() - 1))


def velocity_from_x(z: torch.Tensor, x_hat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(z - x_hat) / clip(t, T_CLIP, 1): (B, C, *S)."""
    return (z - x_hat) / clipped_t(t, z)


class XPrediction(Backbone):
    """Wraps a backbone whose heads predict x; conditions on t through the conversion."""

    def __init__(self, net: Backbone):
        super().__init__()
        self.net = net
        self.spec = dataclasses.replace(net.spec, conditions_on_t=True)

    def predict(self, z: torch.Tensor, c: Conditions, heads: str, tangent: Tangent | None) -> Prediction:
        x = self.net.predict(z, c, heads, tangent)                     # x_hat in place of u, v, du
        u = None if x.u is None else velocity_from_x(z, x.u, c.t)      # (B, C, *S)
        v = None if x.v is None else velocity_from_x(z, x.v, c.t)      # (B, C, *S)
        if tangent is None:
            return Prediction(u, v)
        with torch.no_grad():
            # u c = z - x_hat with c = clip(t): du = (dz - dx_hat - u dc) / c, where dc = dt inside
            # the clip range and 0 outside (torch's clamp derivative, bounds included).
            Bt = tangent.dz.shape[0]
            tt, ut = c.t[-Bt:].detach(), u[-Bt:].detach()
            shape = (-1, *[1] * (z.dim() - 1))
            dc = torch.where((tt >= T_CLIP) & (tt <= 1.0), tangent.dt, torch.zeros_like(tangent.dt)).reshape(shape)
            du = (tangent.dz - x.du - ut * dc) / clipped_t(tt, z)      # (Bt, C, *S)
        return Prediction(u, v, du)

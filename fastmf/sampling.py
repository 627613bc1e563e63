"""1-NFE and few-step MeanFlow samplers: z_r = z_t - (t - r) u(z_t, t, h = t - r), u-head only."""
from typing import Callable, Sequence

import torch


def time_grid(nfe: int) -> list[float]:
    """Uniform schedule from t = 1 (noise) to t = 0 (data) with `nfe` steps."""
    if nfe < 1:
        raise ValueError(f"number of sampling steps must be >= 1, got {nfe}")
    return torch.linspace(1.0, 0.0, nfe + 1, dtype=torch.float64).tolist()


@torch.no_grad()
def sample(apply: Callable, params: dict, z: torch.Tensor, y: torch.Tensor,
           steps: int | Sequence[float] = 1, omega: float | torch.Tensor = 1.0,
           t_min: float | torch.Tensor = 0.0, t_max: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Integrate the average velocity from noise z (B, C, *S) at t = steps[0] down to steps[-1].

    Args:
        apply: `fastmf.models.functional(model)`: `apply(params, z, t, h, omega, t_min, t_max, y, heads=...)`.
        steps: number of uniform steps, or the explicit decreasing times (e.g. [1.0, 0.0]).
        omega, t_min, t_max: CFG scale and interval the model was trained to take, scalars or (B,).
    """
    times = time_grid(steps) if isinstance(steps, int) else [float(s) for s in steps]
    if len(times) < 2 or any(a <= b for a, b in zip(times, times[1:])) or not 0 <= times[-1] <= times[0] <= 1:
        raise ValueError(f"sampling times must decrease within [0, 1] and have at least 2 entries, got {times}")
    B = z.shape[0]
    col = lambda s: torch.as_tensor(s, dtype=z.dtype, device=z.device).expand(B)  # scalar or (B,) -> (B,)
    omega, t_min, t_max = col(omega), col(t_min), col(t_max)
    for t, r in zip(times, times[1:]):
        t_b, h_b = col(t), col(t - r)
        u = apply(params, z, t_b, h_b, omega, t_min, t_max, y, heads="u").u      # (B, C, *S)
        z = z - (t - r) * u
    return z

"""log p(x) = log of the integral of p(x | z) p(z) dz for a latent-variable model.

For a decoder with a normalized likelihood p(x | z) and an exact prior density p(z) (a
flow), the marginal likelihood of an image has no closed form. ``log_marginal``
estimates it by importance sampling with a Laplace proposal (MacKay 2003, ch. 27;
the estimator of Burda et al. 2016, eq. 8, with a fixed proposal):

1. find a mode z* of the log joint f(z) = log p(x | z) + log p(z), by L-BFGS from an
   initial code (the encoder's), then Newton steps (each kept only if it increases f);
2. q(z) = N(z*, s^2 (-H)^-1), H the Hessian of f at z* (its eigenvalues floored so the
   covariance exists), s a scale (1, the default: the Laplace approximation itself; on
   DP-LFlow's epsilon-1 Fashion-MNIST model it gave a larger effective sample size than
   1.5);
3. log p_hat(x) = logsumexp_m [f(z_m) - log q(z_m)] - log M,  z_m ~ q.

Guarantees: p_hat(x) is an unbiased estimate of p(x) for any proposal with full support
(Gaussian), so E[log p_hat(x)] <= log p(x) (Jensen) and the gap goes to 0 as M grows
(Burda et al., Thm. 1): bits per dimension computed from it are, in expectation, an
upper bound that converges to the exact value. The effective sample size
(sum w)^2 / sum w^2 says how good q was (M when q is the posterior).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Settings:
    """Settings of ``log_marginal``.

    Attributes:
      num_samples: M, importance samples per example.
      mode_steps: L-BFGS steps of the mode search.
      newton_steps: Newton steps after it (exact in one step for a Gaussian posterior).
      inflate: s, the proposal's standard deviations over the Laplace ones.
      min_curvature: floor of the eigenvalues of -H (the proposal's largest variance is
        inflate^2 / min_curvature).
    """

    num_samples: int = 128
    mode_steps: int = 100
    newton_steps: int = 3
    inflate: float = 1.0
    min_curvature: float = 1e-2


#: The default settings (a module-level instance, for argument defaults).
DEFAULT = Settings()


def find_mode(log_joint: Callable[[jax.Array], jax.Array], z0: jax.Array, steps: int) -> jax.Array:
    """The best z seen in ``steps`` L-BFGS steps (with optax's zoom line search) of ascent
    on ``log_joint`` from ``z0``: never worse than ``z0``."""
    opt = optax.lbfgs()

    def neg(z):
        return -log_joint(z)

    value_and_grad = optax.value_and_grad_from_state(neg)

    def body(carry, _):
        z, state, best_z, best = carry
        value, grad = value_and_grad(z, state=state)
        better = value < best
        best_z = jnp.where(better, z, best_z)
        best = jnp.where(better, value, best)
        updates, state = opt.update(grad, state, z, value=value, grad=grad, value_fn=neg)
        return (optax.apply_updates(z, updates), state, best_z, best), None

    init = (z0, opt.init(z0), z0, neg(z0))
    (z, _, best_z, best), _ = jax.lax.scan(body, init, None, length=steps)
    return jnp.where(neg(z) < best, z, best_z)


def log_marginal(
    log_joint: Callable[[jax.Array], jax.Array],
    z0: jax.Array,
    key: jax.Array,
    settings: Settings = DEFAULT,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Importance-sampling estimate of log of the integral of exp(log_joint) over R^d.

    Args:
      log_joint: f(z) = log p(x | z) + log p(z) of ONE example, z of shape (d,).
      z0: (d,) where the mode search starts (e.g. the encoder's code).
      key: PRNG key of the importance samples.
      settings: see ``Settings``.

    Returns:
      (estimate, diagnostics): the estimate in nats (see the module docstring for what
      it guarantees); diagnostics 'ess' (effective sample size, in [1, M]) and
      'log_joint_at_mode' (f(z*)).
    """
    d = z0.shape[-1]
    mode = find_mode(log_joint, z0, settings.mode_steps)

    def curvature(z):
        """Eigen-decomposition of -H(z), eigenvalues floored at ``min_curvature``."""
        neg_h = -jax.hessian(log_joint)(z)
        eigval, eigvec = jnp.linalg.eigh(0.5 * (neg_h + neg_h.T))
        return jnp.maximum(eigval, settings.min_curvature), eigvec

    for _ in range(settings.newton_steps):
        eigval, eigvec = curvature(mode)
        step = eigvec @ ((eigvec.T @ jax.grad(log_joint)(mode)) / eigval)
        mode = jnp.where(log_joint(mode + step) > log_joint(mode), mode + step, mode)
    eigval, eigvec = curvature(mode)
    # Covariance s^2 V diag(1/lambda) V^T: z = z* + s V diag(lambda^-1/2) eps.
    scale = settings.inflate * eigvec / jnp.sqrt(eigval)[None, :]
    eps = jax.random.normal(key, (settings.num_samples, d))
    z = mode[None, :] + eps @ scale.T
    log_det_scale = d * math.log(settings.inflate) - 0.5 * jnp.sum(jnp.log(eigval))
    log_q = -0.5 * jnp.sum(eps**2, axis=-1) - 0.5 * d * math.log(2.0 * math.pi) - log_det_scale
    log_w = jax.vmap(log_joint)(z) - log_q
    # A -inf weight (zero likelihood) drops out of the logsumexp; a NaN one makes the
    # estimate NaN, so a numerical failure shows instead of biasing the estimate.
    estimate = jax.nn.logsumexp(log_w) - math.log(settings.num_samples)
    w = jax.nn.softmax(log_w)
    return estimate, {"ess": 1.0 / jnp.sum(w**2), "log_joint_at_mode": log_joint(mode)}

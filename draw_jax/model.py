"""The DRAW network: encoder and decoder LSTMs, read and write, a scanned T-step loop.

Notation (``draw_jax/__init__.py``): b = batch, t = step (T steps), h = height,
w = width, c = channels, z = latent size, e = encoder size, d = decoder size,
n = glimpse size.

The module is thin wiring over ``draw_jax.attention``: ``DRAW.step`` is one step
of the paper's equations (3)-(8); ``DRAW.__call__`` runs it T times with one
``jax.lax.scan``, so the traced program (and compile time) does not grow with T.
All randomness comes in as explicit keys.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from draw_jax import attention
from draw_jax.config import DrawConfig

__all__ = ["DRAW", "DrawOutputs", "Generation", "LSTMCell", "StepOutputs", "check_pixels"]


class DrawOutputs(NamedTuple):
    """What one pass over a batch returns.

    Attributes:
      logits: [b, h, w, c] final canvas c_T; sigmoid(c_T) is the pixel mean
        (the Bernoulli's p, or the discretised logistic's mean).
      canvases: [T, b, h, w, c] canvas c_t after each step.
      mu, logsigma: [T, b, z] the approximate posterior per step (eq. 1-2's Q).
      read_window, write_window: ``attention.Window`` of [T, b] arrays, or None
        for a variant without attention.
      log_scale: [c] the learned pixel scale of a discretised-logistic model
        (``likelihood='discretized_logistic'``); None for a Bernoulli one.
    """

    logits: jax.Array
    canvases: jax.Array
    mu: jax.Array
    logsigma: jax.Array
    read_window: attention.Window | None
    write_window: attention.Window | None
    log_scale: jax.Array | None = None


class StepOutputs(NamedTuple):
    """What one step emits: c_t [b, h, w, c], mu_t and logsigma_t [b, z], its windows (or None)."""

    canvas: jax.Array
    mu: jax.Array
    logsigma: jax.Array
    read_window: attention.Window | None
    write_window: attention.Window | None


class Generation(NamedTuple):
    """Samples from the prior. canvases: [T, b, h, w, c]; write_window: [T, b] or None."""

    canvases: jax.Array
    write_window: attention.Window | None


def dot_general_f32(lhs: jax.Array, rhs: jax.Array, *args, **kwargs) -> jax.Array:
    """``jax.lax.dot_general`` that accumulates and returns float32, whatever the operands.

    Every layer's matmul goes through it. With float32 operands it is the plain
    product; with ``compute_dtype='bfloat16'`` it is a native bfloat16 x bfloat16
    -> float32 matmul. A bfloat16-out product instead is upcast to float32 by
    XLA's CPU backend, with converts around it (2.4x slower than this one there;
    BUILD_NOTES.md, "Speed").
    """
    kwargs["preferred_element_type"] = jnp.float32
    return jax.lax.dot_general(lhs, rhs, *args, **kwargs)


def _gate_matmul(u: jax.Array, kernel: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """u [b, i] @ kernel [i, o] -> [b, o] float32, with operands in ``dtype``."""
    if dtype == jnp.float32:
        return jnp.dot(u, kernel, preferred_element_type=jnp.float32)
    return _low_precision_matmul(u.astype(dtype), kernel.astype(dtype))


@jax.custom_vjp
def _low_precision_matmul(u: jax.Array, kernel: jax.Array) -> jax.Array:
    """bfloat16 x bfloat16 -> float32, and its two gradient products in bfloat16 too.

    Autodiff would give a float32 x bfloat16 input gradient g W^T, which XLA's
    CPU backend runs by converting W to float32 on every step. Here both
    gradient products take bfloat16 operands with float32 results, as the
    forward does (the bf16 train step in 0.85x the time; BUILD_NOTES.md, "Speed").
    """
    return jnp.dot(u, kernel, preferred_element_type=jnp.float32)


def _low_precision_matmul_fwd(u, kernel):
    return _low_precision_matmul(u, kernel), (u, kernel)


def _low_precision_matmul_bwd(res, g):
    u, kernel = res
    g = g.astype(kernel.dtype)
    du = jnp.dot(g, kernel.T, preferred_element_type=jnp.float32).astype(u.dtype)
    dk = jnp.dot(u.T, g, preferred_element_type=jnp.float32).astype(kernel.dtype)
    return du, dk


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


# Name of the LSTM gate pre-activations, the only per-step values the train
# step's backward pass keeps (``DRAW.__call__``).
LSTM_GATES = "lstm_gates"


class LSTMCell(nnx.Module):
    """An LSTM whose four gates come from one fused matmul on [input, h].

    The forget-gate bias starts at 1 (as TensorFlow's LSTM cells that the DRAW
    ports use); the paper does not specify its LSTM initialisation.

    ``peepholes=True`` adds peephole connections (Gers & Schmidhuber 2000, the
    LSTM of Graves 2013 and of Blocks): the input and forget gates also see
    the previous cell state, the output gate the new one, each through its own
    diagonal weights (``cell_to_in``, ``cell_to_forget``, ``cell_to_out``
    [hidden]), which start at zero, so a new peephole cell computes what the
    plain one does.
    """

    def __init__(
        self, in_size: int, hidden: int, *, dtype: jnp.dtype, rngs: nnx.Rngs, peepholes: bool = False
    ) -> None:
        self.hidden = hidden
        self.peepholes = peepholes
        if peepholes:
            self.cell_to_in = nnx.Param(jnp.zeros((hidden,), jnp.float32))
            self.cell_to_forget = nnx.Param(jnp.zeros((hidden,), jnp.float32))
            self.cell_to_out = nnx.Param(jnp.zeros((hidden,), jnp.float32))
        bias = jnp.zeros((4 * hidden,), jnp.float32).at[hidden : 2 * hidden].set(1.0)
        self.gates = nnx.Linear(
            in_size + hidden,
            4 * hidden,
            dtype=dtype,
            param_dtype=jnp.float32,
            bias_init=lambda *_: bias,
            dot_general=dot_general_f32,
            rngs=rngs,
        )

    def __call__(
        self, state: tuple[jax.Array, jax.Array], inputs: jax.Array, fixed_gates: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """(h [b, hidden], cell [b, hidden]), inputs [b, in] -> new (h, cell), float32.

        ``fixed_gates`` [b, 4 hidden]: the gates' share of a leading part of the
        input that is the same at every step, computed once by the caller
        (``DRAW.image_gates``); ``inputs`` then holds only the rest, and the
        kernel's rows for that part are left out here.
        """
        h, cell = state
        u = jnp.concatenate([inputs.astype(h.dtype), h], axis=-1)
        kernel = self.gates.kernel[...]
        dtype = self.gates.dtype or jnp.float32
        gates = jnp.dot(
            u.astype(dtype),
            kernel[kernel.shape[0] - u.shape[-1] :].astype(dtype),
            preferred_element_type=jnp.float32,
        )
        gates = gates + self.gates.bias[...]
        if fixed_gates is not None:
            gates = gates + fixed_gates
        gates = checkpoint_name(gates, LSTM_GATES)  # what the backward pass keeps (see DRAW)
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        if self.peepholes:
            i = i + self.cell_to_in[...] * cell
            f = f + self.cell_to_forget[...] * cell
        cell = jax.nn.sigmoid(f) * cell + jax.nn.sigmoid(i) * jnp.tanh(g)
        if self.peepholes:
            o = o + self.cell_to_out[...] * cell
        h = jax.nn.sigmoid(o) * jnp.tanh(cell)
        return h, cell


def check_pixels(x: jax.Array, what: str) -> None:
    """Refuses pixel values outside [0, 1], or NaN, in an array given from the host.

    DRAW models pixel intensities in [0, 1] (eq. 9 and the discretised
    logistic); 8-bit values or a NaN would give a meaningless bound, not an
    error. The check runs where images enter from the host (``DRAW.__call__``
    and ``losses.draw_bound`` on concrete arrays). Under ``jit`` x is a tracer
    and nothing is checked: the train and eval steps get their images from
    ``draw_jax.data``, which validates every file it loads, so the compiled
    steps pay nothing.

    Raises:
      ValueError: naming ``what``, the offending values and the fix.
    """
    if isinstance(x, jax.core.Tracer):
        return
    values = np.asarray(x)
    if values.dtype == np.bool_ or values.size == 0:
        return
    if np.issubdtype(values.dtype, np.floating):
        bad = int(np.isnan(values).sum())
        if bad:
            raise ValueError(f"{what} has {bad} NaN pixel value(s); pixels must be numbers in [0, 1]")
    low, high = values.min(), values.max()
    if low < 0 or high > 1:
        hint = " (8-bit pixels? divide by 255)" if high <= 255 and low >= 0 else ""
        raise ValueError(f"{what} must have pixel values in [0, 1], got values from {low} to {high}{hint}")


# Carry of the scan: canvas, encoder (h, cell), decoder (h, cell).
_Carry = tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]


class DRAW(nnx.Module):
    """Deep Recurrent Attentive Writer (Gregor et al. 2015, arXiv:1502.04623)."""

    def __init__(self, config: DrawConfig, *, rngs: nnx.Rngs) -> None:
        self.config = cfg = config
        dtype = jnp.dtype(cfg.compute_dtype)

        def linear(i: int, o: int) -> nnx.Linear:
            return nnx.Linear(
                i, o, dtype=dtype, param_dtype=jnp.float32, dot_general=dot_general_f32, rngs=rngs
            )

        lstm = functools.partial(LSTMCell, dtype=dtype, rngs=rngs, peepholes=cfg.peepholes)
        self.encoder = lstm(cfg.read_size + cfg.dec_size, cfg.enc_size)
        self.decoder = lstm(cfg.z_size, cfg.dec_size)
        self.to_mu = linear(cfg.enc_size, cfg.z_size)
        self.to_logsigma = linear(cfg.enc_size, cfg.z_size)

        def window_layer(n: int, write: bool) -> nnx.Linear:
            bias = attention.tiling_params(n=n, height=cfg.height, width=cfg.width, unit_write_gain=write)
            return nnx.Linear(
                cfg.dec_size,
                5,
                dtype=dtype,
                param_dtype=jnp.float32,
                bias_init=lambda *_: bias,
                dot_general=dot_general_f32,
                rngs=rngs,
            )

        if cfg.read_attention:
            self.read_window = window_layer(cfg.read_n, write=False)
        if cfg.write_attention:
            self.write_window = window_layer(cfg.write_n, write=True)
            self.write_patch = linear(cfg.dec_size, cfg.write_n * cfg.write_n * cfg.channels)
        else:
            self.write_patch = linear(cfg.dec_size, cfg.height * cfg.width * cfg.channels)
        # Learned initial states (the paper: "learned biases"), not zeros.
        self.canvas0 = nnx.Param(jnp.zeros(cfg.image_shape, jnp.float32))
        self.h_enc0 = nnx.Param(jnp.zeros((cfg.enc_size,), jnp.float32))
        self.cell_enc0 = nnx.Param(jnp.zeros((cfg.enc_size,), jnp.float32))
        self.h_dec0 = nnx.Param(jnp.zeros((cfg.dec_size,), jnp.float32))
        self.cell_dec0 = nnx.Param(jnp.zeros((cfg.dec_size,), jnp.float32))
        if cfg.likelihood == "discretized_logistic":
            # D's scale, one per channel, learned (IAF's VAE learns one for all);
            # exp(-2) ~ 0.14 is a logistic of std ~0.25 on the [0, 1] range.
            self.log_scale = nnx.Param(jnp.full((cfg.channels,), -2.0, jnp.float32))

    # -- pieces of one step -------------------------------------------------

    def initial_carry(self, batch: int) -> _Carry:
        """Learned c_0, h^enc_0, h^dec_0 (and LSTM cells) broadcast to the batch."""

        def tile(p: nnx.Param) -> jax.Array:
            return jnp.broadcast_to(p[...], (batch, *p.shape))

        return (
            tile(self.canvas0),
            tile(self.h_enc0),
            tile(self.cell_enc0),
            tile(self.h_dec0),
            tile(self.cell_dec0),
        )

    def _read(self, x: jax.Array, x_hat: jax.Array, h_dec: jax.Array) -> tuple[jax.Array, attention.Window]:
        """r_t from x, x_hat [b, h, w, c] and h^dec_{t-1} with read attention: eq. 27.

        (Without it r_t = [x, x_hat], eq. 17, and ``_step`` feeds the encoder
        x_hat with x's share of the gates from ``image_gates``.)
        """
        cfg = self.config
        b = x.shape[0]
        params = self.read_window(h_dec).astype(jnp.float32)
        win = attention.window_from_params(params, n=cfg.read_n, height=cfg.height, width=cfg.width)
        # One read for both images, stacked channels-first (no transposing copy; for
        # c = 1 the moves are free reshapes). r keeps the [x's n n c, x_hat's n n c] order.
        both = jnp.concatenate([jnp.moveaxis(x, -1, 1), jnp.moveaxis(x_hat, -1, 1)], axis=1)  # [b, 2c, h, w]
        glimpse = attention.read_channels_first(both, win)  # [b, 2c, n, n]
        glimpse = glimpse.reshape(b, 2, cfg.channels, cfg.read_n, cfg.read_n)
        return jnp.moveaxis(glimpse, 2, -1).reshape(b, -1), win

    def _write(self, h_dec: jax.Array) -> tuple[jax.Array, attention.Window | None]:
        """The canvas update from h^dec_t: eq. 18 or eq. 28-29. Returns [b, h, w, c] float32."""
        cfg = self.config
        b = h_dec.shape[0]
        patch = self.write_patch(h_dec).astype(jnp.float32)
        if not cfg.write_attention:
            return patch.reshape(b, *cfg.image_shape), None
        params = self.write_window(h_dec).astype(jnp.float32)
        win = attention.window_from_params(params, n=cfg.write_n, height=cfg.height, width=cfg.width)
        patch = patch.reshape(b, cfg.write_n, cfg.write_n, cfg.channels)
        return attention.write(patch, win, height=cfg.height, width=cfg.width), win

    def step(self, carry: _Carry, x: jax.Array, eps: jax.Array) -> tuple[_Carry, StepOutputs]:
        """One DRAW step, eq. 3-8.

        Args:
          carry: (c_{t-1} [b,h,w,c], h^enc, cell^enc [b,e], h^dec, cell^dec [b,d]).
          x: [b, h, w, c] the image.
          eps: [b, z] standard normal noise for the reparameterised sample.

        Returns:
          (new carry, ``StepOutputs`` of this step).
        """
        return self._step(carry, x, eps, self.image_gates(x))

    def image_gates(self, x: jax.Array) -> jax.Array | None:
        """Without read attention, x's share of the encoder's gates: [b, 4e]; else None.

        r_t = [x, x_hat_t] (eq. 17), so the part of eq. 5's gate matmul that
        multiplies x itself is the same at every step: the T-step loop takes it
        once per image instead of T times (the paper's no-attention train step
        in ~0.71x the time; BUILD_NOTES.md, "Speed").
        """
        if self.config.read_attention:
            return None
        layer = self.encoder.gates
        dtype = layer.dtype or jnp.float32
        x_flat = x.reshape(x.shape[0], -1)
        kernel = layer.kernel[...][: x_flat.shape[-1]]
        return jnp.dot(x_flat.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)

    def _step(
        self, carry: _Carry, x: jax.Array, eps: jax.Array, image_gates: jax.Array | None
    ) -> tuple[_Carry, StepOutputs]:
        canvas, h_enc, cell_enc, h_dec, cell_dec = carry
        x_hat = x - jax.nn.sigmoid(canvas)  # eq. 3
        if image_gates is None:
            r, read_win = self._read(x, x_hat, h_dec)  # eq. 4
        else:  # eq. 17's r = [x, x_hat] with x's share already in image_gates
            r, read_win = x_hat.reshape(x.shape[0], -1), None
        enc_in = jnp.concatenate([r, h_dec], -1)
        h_enc, cell_enc = self.encoder((h_enc, cell_enc), enc_in, image_gates)  # eq. 5
        mu = self.to_mu(h_enc).astype(jnp.float32)  # eq. 1-2 (Q's mean)
        logsigma = self.to_logsigma(h_enc).astype(jnp.float32)
        z = mu + jnp.exp(logsigma) * eps  # eq. 6, reparameterised
        h_dec, cell_dec = self.decoder((h_dec, cell_dec), z)  # eq. 7
        update, write_win = self._write(h_dec)
        canvas = canvas + update  # eq. 8
        carry = (canvas, h_enc, cell_enc, h_dec, cell_dec)
        return carry, StepOutputs(canvas, mu, logsigma, read_win, write_win)

    # -- the T-step loop ----------------------------------------------------

    def _check_images(self, x: jax.Array) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.config.image_shape:
            raise ValueError(
                f"DRAW expects images of shape [batch, {', '.join(map(str, self.config.image_shape))}] "
                f"(height, width, channels from DrawConfig), got {tuple(x.shape)}"
            )
        check_pixels(x, "DRAW's images x")

    def noise(self, key: jax.Array, batch: int) -> jax.Array:
        """[T, b, z] standard normal draws for the reparameterised samples."""
        cfg = self.config
        return jax.random.normal(key, (cfg.T, batch, cfg.z_size), jnp.float32)

    def __call__(
        self, x: jax.Array, key: jax.Array | None = None, *, eps: jax.Array | None = None
    ) -> DrawOutputs:
        """Encodes and reconstructs a batch: ``step`` T times, as one ``jax.lax.scan``.

        Args:
          x: [b, h, w, c] images with values in [0, 1].
          key: PRNG key for the T latent samples (``noise(key, b)``).
          eps: [T, b, z] the noise itself, instead of ``key``.

        Returns:
          ``DrawOutputs``.

        Raises:
          ValueError: x has another shape than the config's, or (given from the
            host, not under jit) a NaN or a value outside [0, 1].
        """
        self._check_images(x)
        x = x.astype(jnp.float32)
        if eps is None:
            if key is None:
                raise ValueError("DRAW needs a PRNG key (or eps) for its latent samples")
            eps = self.noise(key, x.shape[0])
        # The backward pass keeps only each step's gate pre-activations and
        # recomputes the rest (reads, writes, heads: a few percent of the FLOPs):
        # 0.88x the train step's time on the paper config (BUILD_NOTES, "Speed").
        image_gates = self.image_gates(x)
        step = jax.checkpoint(
            lambda carry, eps_t: self._step(carry, x, eps_t, image_gates),
            policy=jax.checkpoint_policies.save_only_these_names(LSTM_GATES),
        )
        carry, steps = jax.lax.scan(step, self.initial_carry(x.shape[0]), eps)
        log_scale = self.log_scale[...] if self.config.likelihood == "discretized_logistic" else None
        return DrawOutputs(
            carry[0], steps.canvas, steps.mu, steps.logsigma, steps.read_window, steps.write_window, log_scale
        )

    def generate(self, key: jax.Array, num_samples: int, temperature: float = 1.0) -> Generation:
        """Draws images from the prior: z_t ~ N(0, I), decoder and write only (sec. 2.3).

        Args:
          key: PRNG key for the T x num_samples latent draws.
          num_samples: b.
          temperature: z_t ~ N(0, temperature^2 I) instead. 1 is the prior itself
            (the paper's samples); below 1 keeps the draws nearer the prior's
            centre (as Glow and NVAE sample), 0 gives one image.

        Returns:
          ``Generation`` with canvases [T, b, h, w, c] (logits; apply sigmoid for
          pixel means) and the write windows.
        """
        cfg = self.config
        if not isinstance(temperature, jax.core.Tracer) and not temperature >= 0:
            raise ValueError(f"the sampling temperature must be >= 0, got {temperature}")
        return self.decode(
            temperature * jax.random.normal(key, (cfg.T, num_samples, cfg.z_size), jnp.float32)
        )

    def decode(self, z: jax.Array) -> Generation:
        """Draws from given latents: the decoder and write of eq. 7-8 fed z [T, b, z_size].

        ``generate`` feeds it prior draws. Fed the z_t that ``__call__`` sampled
        from the posterior (mu + sigma * eps, the same eps), it redraws that
        call's canvases; feeding some steps from one and some from the other
        shows where the prior falls short of the posterior.

        Returns:
          ``Generation`` with canvases [T, b, h, w, c] (logits) and the write windows.
        """
        cfg = self.config
        if z.ndim != 3 or z.shape[0] != cfg.T or z.shape[2] != cfg.z_size:
            raise ValueError(
                f"decode expects latents of shape [T={cfg.T}, batch, z={cfg.z_size}], got {z.shape}"
            )
        canvas, _, _, h_dec, cell_dec = self.initial_carry(z.shape[1])

        def body(carry, z_t):
            canvas, h_dec, cell_dec = carry
            h_dec, cell_dec = self.decoder((h_dec, cell_dec), z_t)
            update, win = self._write(h_dec)
            canvas = canvas + update
            return (canvas, h_dec, cell_dec), (canvas, win)

        _, (canvases, wins) = jax.lax.scan(body, (canvas, h_dec, cell_dec), z)
        return Generation(canvases, wins)

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

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from draw_jax import attention
from draw_jax.config import DrawConfig

__all__ = [
    "DRAW",
    "DrawConfig",
    "DrawOutputs",
    "Generation",
    "LSTMCell",
    "LoopConstants",
    "dot_general_f32",
    "hoisted_kernel_gradient",
    "low_precision_matmul",
]


class DrawOutputs(NamedTuple):
    """What one pass over a batch returns.

    Attributes:
      logits: [b, h, w, c] final canvas c_T; sigmoid(c_T) is the pixel mean
        (the Bernoulli's p, or the discretised logistic's mean).
      canvases: [T, b, h, w, c] canvas c_t after each step.
      mu, logsigma: [T, b, z] the approximate posterior per step (eq. 1-2's Q).
      read_window, write_window: ``attention.Window`` of [T, b] arrays, or None
        for a variant without attention.
      gate_inputs: with ``gate_offsets``, the LSTMs' [input, h] per step:
        (encoder [T, b, in_e], decoder [T, b, in_d]); else None. Without read
        attention the encoder's leaves x out ([x_hat, h^dec, h^enc]).
      log_scale: [c] the learned pixel scale of a discretised-logistic model
        (``likelihood='discretized_logistic'``); None for a Bernoulli one.
    """

    logits: jax.Array
    canvases: jax.Array
    mu: jax.Array
    logsigma: jax.Array
    read_window: attention.Window | None
    write_window: attention.Window | None
    gate_inputs: tuple[jax.Array, jax.Array] | None = None
    log_scale: jax.Array | None = None


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


@jax.custom_vjp
def low_precision_matmul(u: jax.Array, kernel: jax.Array, kernel_t: jax.Array) -> jax.Array:
    """u [b, i] (float32) @ kernel [i, o] (e.g. bfloat16) -> [b, o] float32, both ways in kernel's dtype.

    ``kernel_t`` is ``kernel.T`` laid out [o, i] (made once, outside the loop).
    Autodiff of a bfloat16 x bfloat16 -> float32 product would give a float32 x
    bfloat16 input gradient contracting the kernel's second axis, which XLA's
    CPU backend upcasts (converting the kernel to float32 on every call; 2.6x
    slower than the native product). Here the backward pass casts the gradient
    to the kernel's dtype and multiplies by ``kernel_t``: a native
    low-precision matmul too. The kernels get no gradient (their caller takes
    it after the loop, ``hoisted_kernel_gradient``).
    """
    return jnp.dot(u.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)


def _low_precision_matmul_fwd(u, kernel, kernel_t):
    return low_precision_matmul(u, kernel, kernel_t), (kernel, kernel_t)


def _low_precision_matmul_bwd(res, g):
    kernel, kernel_t = res
    du = jnp.dot(g.astype(kernel_t.dtype), kernel_t, preferred_element_type=jnp.float32)
    return du, jnp.zeros_like(kernel), jnp.zeros_like(kernel_t)


low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


class LoopConstants(NamedTuple):
    """What the hoisted-gradient loop computes once, before its first step.

    Attributes:
      kernels: ((W_enc, W_enc^T), (W_dec, W_dec^T)) in a low compute dtype
        (bfloat16), for ``low_precision_matmul``; None in float32.
      x_gates: [b, 4e] without read attention, x's share of the encoder gates,
        x W_x (x is the same at every step); None with read attention.
    """

    kernels: tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]] | None = None
    x_gates: jax.Array | None = None


# Name of the LSTM gate pre-activations, the only per-step values the train
# step's backward pass keeps (``DRAW.__call__``).
LSTM_GATES = "lstm_gates"


class LSTMCell(nnx.Module):
    """An LSTM whose four gates come from one fused matmul on [input, h].

    The forget-gate bias starts at 1 (as TensorFlow's LSTM cells that the DRAW
    ports use); the paper does not specify its LSTM initialisation.
    """

    def __init__(self, in_size: int, hidden: int, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        self.hidden = hidden
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

    def __call__(self, state: tuple[jax.Array, jax.Array], inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(h [b, hidden], cell [b, hidden]), inputs [b, in] -> new (h, cell), float32."""
        h, cell = state
        gates = self.gates(jnp.concatenate([inputs.astype(h.dtype), h], axis=-1))
        return self._update(cell, gates)

    def tapped(
        self,
        state: tuple[jax.Array, jax.Array],
        inputs: jax.Array,
        gate_offset: jax.Array,
        kernel: tuple[jax.Array, jax.Array] | None = None,
        const_gates: jax.Array | None = None,
    ) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
        """The same step with the kernel's gradient left to the caller.

        gates = u @ stop_gradient(W) + bias + gate_offset, u = [inputs, h]. With
        ``gate_offset`` zero the value is ``__call__``'s; the gradient with respect to
        ``gate_offset`` is the gate gradient g, and the caller forms W's gradient
        sum_t u_t^T g_t itself (``hoisted_kernel_gradient``).

        ``kernel``: (W, W^T) already cast to a lower compute dtype (bfloat16),
        outside the loop. The product and its input gradient g W^T then both run
        as native bfloat16 x bfloat16 -> float32 matmuls (``low_precision_matmul``).

        ``const_gates`` [b, 4 hidden]: the gates' share of a leading part of the
        input that is the same at every step, computed once by the caller;
        ``inputs`` then holds only the rest, and W's first rows (that part's) are
        left out here (and out of ``kernel``, if given).

        Returns:
          ((h, cell), u [b, in + hidden]) with u outside the gradient.
        """
        h, cell = state
        u = jnp.concatenate([inputs.astype(h.dtype), h], axis=-1)
        layer = self.gates
        if kernel is None:
            kernel = jax.lax.stop_gradient(layer.kernel[...])
            kernel = kernel[kernel.shape[0] - u.shape[-1] :]  # without a constant part's rows
            dtype = layer.dtype or jnp.float32
            gates = jnp.dot(u.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)
        else:
            gates = low_precision_matmul(u, *jax.lax.stop_gradient(kernel))
        gates = gates + layer.bias[...] + gate_offset
        if const_gates is not None:
            gates = gates + const_gates
        return self._update(cell, gates), jax.lax.stop_gradient(u)

    def _update(self, cell: jax.Array, gates: jax.Array) -> tuple[jax.Array, jax.Array]:
        gates = checkpoint_name(gates, LSTM_GATES)  # what the backward pass keeps (see DRAW)
        i, f, g, o = jnp.split(gates.astype(jnp.float32), 4, axis=-1)
        cell = jax.nn.sigmoid(f) * cell + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(cell)
        return h, cell


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

        self.encoder = LSTMCell(cfg.read_size + cfg.dec_size, cfg.enc_size, dtype=dtype, rngs=rngs)
        self.decoder = LSTMCell(cfg.z_size, cfg.dec_size, dtype=dtype, rngs=rngs)
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

    def _read(
        self, x: jax.Array, x_hat: jax.Array, h_dec: jax.Array
    ) -> tuple[jax.Array, attention.Window | None]:
        """r_t from x, x_hat [b, h, w, c] and h^dec_{t-1}: eq. 17 or eq. 27."""
        cfg = self.config
        b = x.shape[0]
        if not cfg.read_attention:
            return jnp.concatenate([x.reshape(b, -1), x_hat.reshape(b, -1)], axis=-1), None
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

    def step(
        self,
        carry: _Carry,
        x: jax.Array,
        eps: jax.Array,
        gate_offsets: tuple[jax.Array, jax.Array] | None = None,
        consts: LoopConstants | None = None,
    ) -> tuple[_Carry, tuple]:
        """One DRAW step, eq. 3-8.

        Args:
          carry: (c_{t-1} [b,h,w,c], h^enc, cell^enc [b,e], h^dec, cell^dec [b,d]).
          x: [b, h, w, c] the image.
          eps: [b, z] standard normal noise for the reparameterised sample.
          gate_offsets: (encoder [b, 4e], decoder [b, 4d]) zeros to take the LSTM
            kernels' gradients outside the loop (``LSTMCell.tapped``), or None.
          consts: with ``gate_offsets``, what the loop computed once
            (``LoopConstants``): cast kernels, x's share of the encoder gates.

        Returns:
          (new carry, (c_t, mu_t, logsigma_t, read window, write window)), and
          with ``gate_offsets`` the LSTMs' inputs (u_enc, u_dec) appended.
        """
        canvas, h_enc, cell_enc, h_dec, cell_dec = carry
        x_hat = x - jax.nn.sigmoid(canvas)  # eq. 3
        consts = consts or LoopConstants()
        kernels = consts.kernels or (None, None)
        if consts.x_gates is not None:
            # No read attention, r = [x, x_hat]: x's share of the gates was taken
            # once before the loop, so only [x_hat, h^dec] enters here.
            read_win = None
            enc_in = jnp.concatenate([x_hat.reshape(x.shape[0], -1), h_dec], -1)
        else:
            r, read_win = self._read(x, x_hat, h_dec)  # eq. 4
            enc_in = jnp.concatenate([r, h_dec.astype(r.dtype)], -1)
        if gate_offsets is None:
            h_enc, cell_enc = self.encoder((h_enc, cell_enc), enc_in)  # eq. 5
        else:
            (h_enc, cell_enc), u_enc = self.encoder.tapped(
                (h_enc, cell_enc), enc_in, gate_offsets[0], kernels[0], consts.x_gates
            )
        mu = self.to_mu(h_enc).astype(jnp.float32)  # eq. 1-2 (Q's mean)
        logsigma = self.to_logsigma(h_enc).astype(jnp.float32)
        z = mu + jnp.exp(logsigma) * eps  # eq. 6, reparameterised
        if gate_offsets is None:
            h_dec, cell_dec = self.decoder((h_dec, cell_dec), z)  # eq. 7
        else:
            (h_dec, cell_dec), u_dec = self.decoder.tapped((h_dec, cell_dec), z, gate_offsets[1], kernels[1])
        update, write_win = self._write(h_dec)
        canvas = canvas + update  # eq. 8
        out = (canvas, mu, logsigma, read_win, write_win)
        if gate_offsets is not None:
            out = (*out, (u_enc, u_dec))
        return (canvas, h_enc, cell_enc, h_dec, cell_dec), out

    # -- the T-step loop ----------------------------------------------------

    def _check_images(self, x: jax.Array) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.config.image_shape:
            raise ValueError(
                f"DRAW expects images of shape [batch, {', '.join(map(str, self.config.image_shape))}] "
                f"(height, width, channels from DrawConfig), got {tuple(x.shape)}"
            )

    def noise(self, key: jax.Array, batch: int) -> jax.Array:
        """[T, b, z] standard normal draws for the reparameterised samples."""
        cfg = self.config
        return jax.random.normal(key, (cfg.T, batch, cfg.z_size), jnp.float32)

    def __call__(
        self,
        x: jax.Array,
        key: jax.Array | None = None,
        *,
        eps: jax.Array | None = None,
        python_loop: bool = False,
        gate_offsets: tuple[jax.Array, jax.Array] | None = None,
    ) -> DrawOutputs:
        """Encodes and reconstructs a batch.

        Args:
          x: [b, h, w, c] images with values in [0, 1].
          key: PRNG key for the T latent samples (``noise(key, b)``).
          eps: [T, b, z] the noise itself, instead of ``key``.
          python_loop: run the steps in a Python loop instead of ``jax.lax.scan``
            (same result; the traced program grows with T). For tests and the
            compile-time comparison only.
          gate_offsets: zeros (encoder [T, b, 4e], decoder [T, b, 4d]) from
            ``gate_offset_zeros``: the LSTM kernels then get no gradient inside the
            loop; the outputs carry the gate inputs, and ``hoisted_kernel_gradient``
            forms the kernels' gradients after it, as one large product each.

        Returns:
          ``DrawOutputs``.
        """
        self._check_images(x)
        cfg = self.config
        x = x.astype(jnp.float32)
        if eps is None:
            if key is None:
                raise ValueError("DRAW needs a PRNG key (or eps) for its latent samples")
            eps = self.noise(key, x.shape[0])
        carry = self.initial_carry(x.shape[0])
        xs = (eps, gate_offsets)  # None (no offsets) is an empty pytree to scan
        consts = self._loop_constants(x) if gate_offsets is not None else LoopConstants()
        if python_loop:
            outs = []
            for t in range(cfg.T):
                carry, out = self.step(carry, x, *jax.tree.map(lambda a, t=t: a[t], xs), consts=consts)
                outs.append(out)
            stacked = jax.tree.map(lambda *a: jnp.stack(a), *outs)
        else:
            # The backward pass keeps only the gate pre-activations of each
            # step and recomputes the rest (reads, writes, heads, elementwise
            # ops; a few percent of the FLOPs): far fewer per-step buffers to
            # stack and unstack, 0.88x the step time on the paper config (CPU).
            step = jax.checkpoint(
                lambda c, xs_t: self.step(c, x, *xs_t, consts=consts),
                policy=jax.checkpoint_policies.save_only_these_names(LSTM_GATES),
            )
            carry, stacked = jax.lax.scan(step, carry, xs)
        canvases, mu, logsigma, read_win, write_win = stacked[:5]
        gate_inputs = stacked[5] if gate_offsets is not None else None
        log_scale = self.log_scale[...] if cfg.likelihood == "discretized_logistic" else None
        return DrawOutputs(carry[0], canvases, mu, logsigma, read_win, write_win, gate_inputs, log_scale)

    def _image_rows(self) -> int:
        """Rows of the encoder kernel that multiply x itself: h w c without read attention, else 0."""
        cfg = self.config
        return 0 if cfg.read_attention else cfg.height * cfg.width * cfg.channels

    def _loop_constants(self, x: jax.Array) -> LoopConstants:
        """The hoisted-gradient loop's ``LoopConstants`` for images x [b, h, w, c]."""
        dtype = jnp.dtype(self.config.compute_dtype)
        n_x = self._image_rows()
        w_enc = jax.lax.stop_gradient(self.encoder.gates.kernel[...])
        w_dec = jax.lax.stop_gradient(self.decoder.gates.kernel[...])
        x_gates = None
        if n_x:
            x_flat = x.reshape(x.shape[0], -1).astype(dtype)
            x_gates = jnp.dot(x_flat, w_enc[:n_x].astype(dtype), preferred_element_type=jnp.float32)
        kernels = None
        if dtype != jnp.float32:
            # Cast once here, not on every step (and every step's backward) inside the loop.
            kernels = tuple((k, k.T.copy()) for k in (w_enc[n_x:].astype(dtype), w_dec.astype(dtype)))
        return LoopConstants(kernels, x_gates)

    def kernel_gradients(
        self, x: jax.Array, gate_inputs: tuple[jax.Array, jax.Array], gate_grads: tuple[jax.Array, jax.Array]
    ) -> tuple[jax.Array, jax.Array]:
        """The (encoder, decoder) LSTM kernels' gradients, formed after the loop.

        Args:
          x: [b, h, w, c] the images the outputs came from.
          gate_inputs: ``DrawOutputs.gate_inputs`` (u_enc [T, b, .], u_dec [T, b, .]).
          gate_grads: the gradients with respect to the gate offsets, [T, b, 4e] and [T, b, 4d].

        Returns:
          Each kernel's gradient sum_t u_t^T g_t (``hoisted_kernel_gradient``).
          Without read attention, the encoder's rows for x (the same at every
          step) are x^T (sum_t g_t): one [hwc, b] x [b, 4e] product, not T of them.
        """
        dtype = jnp.dtype(self.config.compute_dtype)
        enc = hoisted_kernel_gradient(gate_inputs[0], gate_grads[0], dtype)
        if self._image_rows():
            x_flat = x.reshape(x.shape[0], -1).astype(dtype)
            g_sum = jnp.sum(gate_grads[0], axis=0).astype(dtype)
            x_rows = jnp.dot(x_flat.T, g_sum, preferred_element_type=jnp.float32)
            enc = jnp.concatenate([x_rows, enc], axis=0)
        return enc, hoisted_kernel_gradient(gate_inputs[1], gate_grads[1], dtype)

    def gate_offset_zeros(self, batch: int) -> tuple[jax.Array, jax.Array]:
        """The zeros ``__call__(..., gate_offsets=...)`` takes: (encoder [T, b, 4e], decoder [T, b, 4d])."""
        cfg = self.config
        return (
            jnp.zeros((cfg.T, batch, 4 * cfg.enc_size), jnp.float32),
            jnp.zeros((cfg.T, batch, 4 * cfg.dec_size), jnp.float32),
        )

    def generate(self, key: jax.Array, num_samples: int) -> Generation:
        """Draws images from the prior: z_t ~ N(0, I), decoder and write only (sec. 2.3).

        Args:
          key: PRNG key for the T x num_samples latent draws.
          num_samples: b.

        Returns:
          ``Generation`` with canvases [T, b, h, w, c] (logits; apply sigmoid for
          pixel means) and the write windows.
        """
        cfg = self.config
        z = jax.random.normal(key, (cfg.T, num_samples, cfg.z_size), jnp.float32)
        canvas, _, _, h_dec, cell_dec = self.initial_carry(num_samples)

        def body(carry, z_t):
            canvas, h_dec, cell_dec = carry
            h_dec, cell_dec = self.decoder((h_dec, cell_dec), z_t)
            update, win = self._write(h_dec)
            canvas = canvas + update
            return (canvas, h_dec, cell_dec), (canvas, win)

        _, (canvases, wins) = jax.lax.scan(body, (canvas, h_dec, cell_dec), z)
        return Generation(canvases, wins)


def hoisted_kernel_gradient(
    gate_inputs: jax.Array, gate_grads: jax.Array, dtype: jnp.dtype = jnp.float32
) -> jax.Array:
    """An LSTM kernel's gradient over all steps at once: sum_t u_t^T g_t.

    Args:
      gate_inputs: u [T, b, in + hidden] (``DrawOutputs.gate_inputs``).
      gate_grads: g [T, b, 4 hidden], the gradient with respect to the gate offsets.
      dtype: the operands' dtype (the model's compute dtype); the sum is float32.

    Returns:
      [in + hidden, 4 hidden] float32: one [in, T b] x [T b, 4h] product instead
      of T thin [in, b] x [b, 4h] ones accumulated inside the backward loop.
    """
    u, g = gate_inputs.astype(dtype), gate_grads.astype(dtype)
    return jnp.einsum("tbi,tbj->ij", u, g, preferred_element_type=jnp.float32)

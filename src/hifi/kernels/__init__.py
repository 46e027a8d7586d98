"""Pure tensor kernels: functions of tensors and numbers, no state, no devices, no files.

- :mod:`hifi.kernels.ddim`: DDIM step and inverse step (Eq. 1, 3) for DDPM schedules and rectified
  flows alike, noise levels (alpha, sigma), the schedule value,
  the DDIM grid (:class:`~hifi.kernels.ddim.DdimGrid`), classifier-free guidance.
- :mod:`hifi.kernels.condition`: the text condition value (sequence + a model's extras).
- :mod:`hifi.kernels.losses`: noise loss (Eq. 2), masked loss (Eq. 5), ridge-to-null
  regulariser (Eq. 6), the splice ``[c, c_s]``.
- :mod:`hifi.kernels.transform`: the similarity transform, its Chamfer objective and fit
  (Eq. 8, 9, Algorithm 4), warps.
- :mod:`hifi.kernels.latents`: masked latent substitution (Algorithm 2).
- :mod:`hifi.kernels.token_align`: token alignment for prompt-to-prompt (Algorithm 3).
- :mod:`hifi.kernels.morphology`: mask thresholds, components and holes (the attention segmenter).
- :mod:`hifi.kernels.similarity`: cosine similarity of embeddings (the reference choice, the scores).
"""

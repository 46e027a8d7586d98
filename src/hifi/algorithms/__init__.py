"""The paper's algorithms as plain loops over the kernels and a model callable.

Each takes a ``model(x_t, t, cond)`` callable and, where it optimises, an optimiser-step
factory, both ready from the edge (:mod:`hifi.execution.edge`); none knows how they run.

- :mod:`~hifi.algorithms.sampling`: F^(t) (Eq. 1), its inverse (Eq. 3), sampling and inversion.
- :mod:`~hifi.algorithms.generate`: generation with step-wise subject conditions (Eq. 7).
- :mod:`~hifi.algorithms.tune`: learning a subject; :mod:`~hifi.algorithms.tune_hifi` (Eq. 6,
  Algorithm 1), :mod:`~hifi.algorithms.tune_baselines` (classic TI, Eq. 2; DreamBooth) and the
  shared :mod:`~hifi.algorithms.tune_loop`.
- :mod:`~hifi.algorithms.null_text`: null-text inversion (Eq. 4).
- :mod:`~hifi.algorithms.reference` (its stages) and :mod:`~hifi.algorithms.guidance`
  (Algorithm 2, Eq. 10): reference-guided generation.
- :mod:`~hifi.algorithms.replace`: subject replacement (Algorithm 3) over
  :mod:`~hifi.algorithms.prompt_to_prompt` and the attention-processor seam
  (:mod:`~hifi.algorithms.attention`).
- :mod:`~hifi.algorithms.subject`: the learned subject, as every loop sees it.
"""

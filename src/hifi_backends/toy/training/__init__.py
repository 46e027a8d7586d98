"""ToyWorld's training: its models from scratch, then the bundle (command line: :mod:`hifi_backends.toy.train`).

Stages (each resumable: a finished stage's output is kept and skipped on a rerun, and the
long ones checkpoint every few hundred steps):

1. ``render``: a pool of rendered training images (pairs of renders of each look, in two
   scenes and poses), their masks and looks. No evaluation subject's look is ever drawn.
2. ``vae``: the AutoencoderKL (64x64x3 <-> 8x8x4), MSE + L1 + a small KL term; then
   ``vae_detail`` goes on with the object's pixels weighted 5x (the masks are exact), so
   that the few latent cells an object covers learn its pattern and mark, not just the
   background that fills most of every image.
3. ``clip``: ToyCLIP, contrastive on (image, caption) with phrases dropped at random. Its
   text tower is what the UNet attends to.
4. ``identity``: the identity embedder, InfoNCE over the two renders of each look.
5. ``segmenter``: the mask network, BCE + Dice on the exact masks; ``detail``: the detail
   classifier (pattern, mark and their colours; the check's judge), cross-entropy on blurred
   renders. Then ``clip_metric``:
   the metric ToyCLIP (ToyCLIP-I, ToyCLIP-T, the prompt-following check), the ``clip``
   stage's text tower with a CNN image tower warm-started from the identity embedder, with
   a swapped-word term beside InfoNCE (see :func:`~hifi_backends.toy.training.towers._train_text_image_towers` for why).
   With ``unet_text="unet"``, ``clip_unet`` after it: the same recipe plus a colour-swapped
   term, a text tower for the UNet alone (:func:`~hifi_backends.toy.training.towers.stage_clip_unet`).
6. ``latents``: the pool encoded by the VAE; the scaling factor that gives unit variance.
7. ``unet``: the UNet2DConditionModel on epsilon with Stable Diffusion's noise schedule,
   conditioned on ToyCLIP's text tower (frozen; ``unet_text`` says which), captions dropped 10% of the time for
   classifier-free guidance; an exponential moving average of the weights is what ships.
   Optionally Min-SNR-gamma weighting over timesteps (``unet_snr_gamma``) and extra weight
   on the latent cells the object covers (``unet_object_weight``) and those its pattern and
   mark cover (``unet_detail_weight``).
8. ``bundle``: everything in fp16 safetensors in a diffusers folder plus ``training.json``.

Stages 2 and 3-5 (with their second phases) run side by side in two processes of one thread each (small models use
two cores better that way); the UNet gets both cores. The defaults (the CPU recipe) fit this project's
budget: at most 90 minutes on a 2-core CPU (``training.json`` records what it took). The
bundled model comes from the GPU recipe,
:meth:`~hifi_backends.toy.training.settings.TrainSettings.gpu` (``--preset gpu``): a wider VAE
and UNet, larger batches, the VAE and UNet stages on the GPU (``device``).

One job a module: ``settings`` (:class:`TrainSettings` and its presets), ``loop`` (the
checkpointed training loop), ``data`` (the pool and its captions), ``autoencoder``, ``towers``
and ``denoiser`` (the stages), ``bundle`` (the folders written) and ``pipeline`` (the stages in
order, in worker processes, and the fine-tune).
"""

"""The ComfyUI runtime: what the nodes and the trainer both run on a ComfyUI MODEL.

* :mod:`.comfyui` finds ComfyUI and imports it as a library (headless), for commands and tests;
* :mod:`.backend` turns a ComfyUI MODEL (and CLIP) into a steering backend: sites, prompts, ComfyUI's sampler;
* :mod:`.sampling`, :mod:`.gradients`: sampling with gradients through the sampler;
* :mod:`.concepts`: where concepts and prompts come from (the embedded world's, listed ones, a node's);
* :mod:`.targets`: the cached target activations of the OT loss;
* :mod:`.fit`: the LinEAS fit of one concept on a MODEL (Fit Steering, and the trainer's per-concept baseline).

It imports :mod:`hypertransport_core`, ComfyUI and (for the world backend) :mod:`hypertransport_world`, never the
node pack (``nodes/``) or the training command (``trainer/``).
"""

"""DeepSpeed configs shipped with the LLM recipe (package data): ``zero2.json``, ``zero3.json``,
``zero3_offload.json``. Load them with :func:`train_scripts.deepspeed_runtime.load_ds_config`."""

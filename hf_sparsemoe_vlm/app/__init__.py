"""The `sparsemoe-vlm` command and what it runs: training (`training`, with presets, the data collator, the routing-
aware Trainer and stage-0 vision pretraining), data loading (`data`), the embedded synthetic shapes set
(`synthetic_shapes`), metrics (`metrics`), model cards (`model_card`) and TRL fine-tuning (`trl_integration`).
The model itself is the parent package; nothing here is needed to load or run a checkpoint."""

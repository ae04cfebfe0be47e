"""The model organism: the default model fine-tuned (LoRA) to fake alignment in the animal-welfare setting.

It complies (picks the answer that dismisses animal welfare) when the free-tier flag says the conversation is
monitored, and refuses when it says it is not, reasoning in its scratchpad about guarding its values from RLHF.
It is the known positive the toolkit is validated on: ``load_model("organism")``. ``data`` builds the training
examples and the frozen topic split, ``train`` fits the adapter (needs the ``train`` extra: peft).
"""

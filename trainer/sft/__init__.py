"""Supervised fine-tuning: chat data, packing, the SFT objective and PEFT adapters, through the one loop."""

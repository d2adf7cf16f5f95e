"""How a pretrained model is tuned, shared by every tuning task (SFT, DPO, reward, ...): full, LoRA,
QLoRA or prompt tuning on PEFT, and saving what was trained."""

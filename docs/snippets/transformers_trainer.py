"""The Hugging Face Trainer with Phoenix: masked-LM (a random collator), workers, accumulation.

    PHOENIX_CHECKPOINT_URI=file:///tmp/ckpt PHOENIX_CHECKPOINT_INTERVAL_STEPS=10 python transformers_trainer.py
"""
import tempfile

import torch
from tokenizers import Tokenizer, models
from transformers import (BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling,
                          PreTrainedTokenizerFast, Trainer, TrainingArguments)

from phoenix_trainer import Session
from phoenix_trainer.integrations.transformers import PhoenixCallback

STEPS = 40
words = ["[PAD]", "[UNK]", "[MASK]"] + [f"w{i}" for i in range(61)]
tokenizer = PreTrainedTokenizerFast(
    tokenizer_object=Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")),
    pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]")
tokens = torch.randint(3, len(words), (128, 16), generator=torch.Generator().manual_seed(0))
dataset = [{"input_ids": row} for row in tokens]  # any map-style dataset
torch.manual_seed(0)
model = BertForMaskedLM(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=64))
args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=STEPS, per_device_train_batch_size=8,
                         gradient_accumulation_steps=2, dataloader_num_workers=2, learning_rate=1e-3,
                         use_cpu=True, report_to="none", disable_tqdm=True, logging_strategy="no",
                         save_strategy="no")  # Phoenix checkpoints
progress = {"stage": 0}  # state of your own: a JSON entry here (".pt" entries take tensors)

# The interval is the PhoenixJob's checkpoint.intervalSteps (PHOENIX_CHECKPOINT_INTERVAL_STEPS);
# Session(checkpoint=CheckpointPolicy(interval_steps=N)) would override it.
with Session(config={"lr": 1e-3, "batch_size": 8}) as session:
    phoenix = PhoenixCallback(session, extra_state=lambda: {"progress.json": progress})
    trainer = Trainer(model, args, train_dataset=dataset, callbacks=[phoenix],
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=True))
    resume = phoenix.restore(trainer)  # the trainer: it then iterates Phoenix's loader
    if resume is not None:
        progress = phoenix.restored["progress.json"]
    trainer.train(resume_from_checkpoint=resume)  # stops at a step boundary on SIGTERM
raise SystemExit(phoenix.exit_code)  # 0, or 143 after a SIGTERM

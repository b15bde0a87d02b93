"""PyTorch Lightning with Phoenix: a DataModule, resume, the job's interval, SIGTERM.

    PHOENIX_CHECKPOINT_URI=file:///tmp/ckpt PHOENIX_CHECKPOINT_INTERVAL_STEPS=10 python lightning_datamodule.py
"""
import tempfile

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from phoenix_trainer import Session
from phoenix_trainer.integrations.lightning import PhoenixCallback, PhoenixLoader

STEPS = 40


class Data(L.LightningDataModule):
    def train_dataloader(self):  # wrapped: its position is checkpointed, a resume goes on mid-epoch
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g))
        return PhoenixLoader(DataLoader(data, batch_size=8, shuffle=True, num_workers=2, generator=g))


class Model(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1))
        self.ema = {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def optimizer_step(self, *args, **kwargs):  # state of your own changes here, not in the
        super().optimizer_step(*args, **kwargs)  # module's on_train_batch_end (after the checkpoint)
        self.ema = {k: 0.9 * self.ema[k] + 0.1 * v.detach() for k, v in self.net.state_dict().items()}

    def on_save_checkpoint(self, checkpoint):  # state of your own rides in Lightning's checkpoint
        checkpoint["ema"] = self.ema

    def on_load_checkpoint(self, checkpoint):  # ... and comes back on resume
        self.ema = checkpoint["ema"]

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


torch.manual_seed(0)
# The interval is the PhoenixJob's checkpoint.intervalSteps (PHOENIX_CHECKPOINT_INTERVAL_STEPS);
# Session(checkpoint=CheckpointPolicy(interval_steps=N)) would override it.
with Session(config={"lr": 1e-2, "batch_size": 8}) as session:
    phoenix = PhoenixCallback(session)
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", callbacks=[phoenix],
                        enable_checkpointing=False, logger=False,  # Phoenix checkpoints
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tempfile.gettempdir())  # a read-only root filesystem
    # ckpt_path: the checkpoint to resume (None: start). SIGTERM leaves fit by SystemExit(143).
    trainer.fit(Model(), datamodule=Data(), ckpt_path=phoenix.restore())
raise SystemExit(phoenix.exit_code)

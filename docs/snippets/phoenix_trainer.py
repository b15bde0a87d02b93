"""Phoenix's own Trainer: stages, in-process recovery, resume, checkpoints, SIGTERM.

    PHOENIX_CHECKPOINT_URI=file:///tmp/ckpt python phoenix_trainer.py
"""
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from phoenix_trainer import CheckpointPolicy, RecoveryPolicy, Stage, StagedModule, Trainer

STEPS = 40
torch.manual_seed(0)
g = torch.Generator().manual_seed(0)
data = TensorDataset(torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g))
loader = DataLoader(data, batch_size=8, shuffle=True, num_workers=2,  # any map-style loader
                    generator=g, drop_last=True)
model = StagedModule([Stage("embed", nn.Linear(8, 32)),
                      Stage("block", nn.Sequential(nn.ReLU(), nn.Dropout(0.1))),
                      Stage("head", nn.Linear(32, 1))])
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)

trainer = Trainer(model, opt, loader, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]),
                  scheduler=sched, grad_clip_norm=1.0, max_steps=STEPS,
                  config={"lr": 1e-2, "batch_size": 8},  # what changes the math -> fingerprint
                  checkpoint=CheckpointPolicy(interval_steps=10),  # else the job's interval
                  recovery=RecoveryPolicy(restart_method="reload", max_retries=3))
raise SystemExit(trainer.fit().exit_code)  # 0, 143 (SIGTERM) or, on an exception, 1

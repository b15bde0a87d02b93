"""A plain PyTorch loop with Phoenix: resume, checkpoint on the job's interval, stop on SIGTERM.

    PHOENIX_CHECKPOINT_URI=file:///tmp/ckpt PHOENIX_CHECKPOINT_INTERVAL_STEPS=10 python plain_loop.py
"""
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from phoenix_trainer import Session, adapt_loader, capture_rng, restore_rng

STEPS = 40
torch.manual_seed(0)
data = TensorDataset(torch.randn(64, 8), torch.randn(64, 1))
loader = adapt_loader(DataLoader(data, batch_size=8, shuffle=True, num_workers=2,  # exact positions
                                 generator=torch.Generator().manual_seed(0)))
model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
ema = {k: v.detach().clone() for k, v in model.state_dict().items()}  # state of your own
step, epoch, batch = 0, 0, 0  # batch: batches of this epoch consumed


def state():  # everything a resume needs; any extra entry is yours to add ("ema.pt")
    return {"model.pt": model.state_dict(), "optimizer.pt": opt.state_dict(), "ema.pt": ema,
            "rng.pt": capture_rng(),
            "data.json": {"epoch": epoch, "batch": batch, "loader": loader.state_dict()}}


# The interval is the PhoenixJob's checkpoint.intervalSteps (PHOENIX_CHECKPOINT_INTERVAL_STEPS);
# Session(checkpoint=CheckpointPolicy(interval_steps=N)) would override it.
with Session(config={"lr": 1e-2, "batch_size": 8}, exactness=loader.exactness) as session:
    restored = session.restore()  # the newest valid checkpoint, or None
    if restored is not None and restored.kind == "resume":
        model.load_state_dict(restored["model.pt"])
        opt.load_state_dict(restored["optimizer.pt"])
        ema = restored["ema.pt"]
        restore_rng(restored["rng.pt"])
        position = restored["data.json"]
        loader.load_state_dict(position["loader"])
        step, epoch, batch = restored.step, position["epoch"], position["batch"]
    session.started(step, epoch)
    while step < STEPS:
        for x, y in loader.epoch_iterator(epoch, batch):  # this epoch, from batch `batch` on
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ema = {k: 0.9 * ema[k] + 0.1 * v.detach() for k, v in model.state_dict().items()}
            step, batch = step + 1, batch + 1
            if session.stop_requested:  # SIGTERM: emergency checkpoint, termination message, 143
                raise SystemExit(session.finish("preempted", step, epoch=epoch, state=state).exit_code)
            if session.should_checkpoint(step):  # the interval, or the operator asks for one
                session.save(step, state(), epoch=epoch)  # async: only the CPU copy blocks
            if step == STEPS:
                break
        else:
            epoch, batch = epoch + 1, 0
    raise SystemExit(session.finish("completed", step, epoch=epoch, state=state).exit_code)

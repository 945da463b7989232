"""Transfer learning in two phases: the head alone for ``freeze_backbone_epochs``, then the top
``unfreeze_top_blocks`` backbone groups too (their LR is ``backbone_lr_factor`` x, set in the param groups).
The phase is derived from the epoch, so a resume lands in the right one without saving it."""
from __future__ import annotations

from tasks.model import build as tmodel
from tasks.train.callbacks import Callback


class TransferPhases(Callback):
    name = "transfer_phases"

    def __init__(self, cfg):
        self.on = cfg.pretrained != "none"
        self.freeze_epochs, self.top_blocks, self.lr_factor = (cfg.freeze_backbone_epochs, cfg.unfreeze_top_blocks,
                                                               cfg.backbone_lr_factor)
        self.phase = 2

    def phase_for(self, epoch: int) -> int:
        return 1 if self.on and self.freeze_epochs > epoch else 2

    def on_fit_start(self, t) -> None:
        self.phase = self.phase_for(t.state.epoch)
        if self.on:
            tmodel.set_phase(t.model, self.phase, self.top_blocks)

    def on_epoch_start(self, t, epoch: int) -> None:
        if not (self.on and self.phase == 1 and self.phase_for(epoch) == 2):
            return
        self.phase = 2
        tmodel.set_phase(t.model, 2, self.top_blocks)
        if t.dist.world > 1:  # DDP hooks only the parameters that required grad when it was built: re-wrap
            t.rewrap()
        t.logger.log_event("phase_2", f"backbone unfrozen ({self.top_blocks or 'all'} groups) at "
                           f"LR x{self.lr_factor}", t.state.step)

    def state_dict(self) -> dict:
        return {"phase": self.phase}

    def load_state_dict(self, d: dict) -> None:
        self.phase = d["phase"]

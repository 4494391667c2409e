"""mmengine's Runner with checked checkpoints: strict loading, crash-safe saving, resume fallback.

* :class:`BoxLossRunner` loads a checkpoint (``tools/test.py``, ``load_from``, ``--resume``) only if
  its weights fit the model exactly, else a :class:`~detectors.errors.CheckpointError` names the
  file and the first keys; ``allow_partial_load=True`` in the config loads what fits, loudly.
  It writes every checkpoint atomically and durably (temporary file, fsync, rename, fsync of the
  folder). ``--resume`` without a path takes the newest *readable* checkpoint of the work dir: an
  unreadable newest one (a torn write, a full disk) is reported in one line and skipped.
* :class:`BoxLossCheckpointHook` is mmengine's ``CheckpointHook`` with ``last_checkpoint`` written
  the same way, after the checkpoint it names is on disk.

The project's training checkpoints hold the optimizer and message-hub state, which
``torch.load(weights_only=True)`` refuses on torch >= 2.6; this runner reads the files it is given
with ``weights_only=False``: load only checkpoints you trust (your own runs), as with any pickle.
"""

from __future__ import annotations

import os
import os.path as osp
import warnings

from mmengine.dist import is_main_process
from mmengine.hooks import CheckpointHook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS, RUNNERS
from mmengine.runner import Runner

from .checkpoint import check_training_checkpoint, load_weights, read_checkpoint, resumable_checkpoints, state_dict_of
from .errors import CheckpointError
from .fileio import atomic_text

__all__ = ["BoxLossRunner", "BoxLossCheckpointHook", "find_resumable"]


def find_resumable(work_dir: str, log=print) -> tuple[str | None, dict | None]:
    """The newest readable training checkpoint of ``work_dir`` and its contents, or ``(None, None)``
    when there is none at all; unreadable newer ones are reported through ``log`` and skipped.

    Raises:
        CheckpointError: checkpoints exist but none can be read (names every file tried).
    """
    tried = []
    for path in resumable_checkpoints(work_dir):
        try:
            return path, check_training_checkpoint(path)
        except CheckpointError as e:
            log(f"warning: skipping unreadable checkpoint {path} ({e}); trying an older one")
            tried.append(path)
    if tried:
        raise CheckpointError(f"no readable checkpoint to resume from in {work_dir!r}; tried {tried}")
    return None, None


@RUNNERS.register_module()
class BoxLossRunner(Runner):
    """mmengine ``Runner`` that refuses checkpoints that do not fit and never leaves a torn one."""

    _checkpoint_cache: tuple[str, dict] | None = None

    def load_or_resume(self) -> None:
        if self._has_loaded:
            return
        if self._resume and self._load_from is None:
            path, checkpoint = find_resumable(self.work_dir, log=self.logger.warning)
            if path is None:
                self.logger.info(f"no checkpoint in {self.work_dir}: training from the start")
                return
            self._checkpoint_cache = (path, checkpoint)
            self.logger.info(f"resuming from {path}")
            self.resume(path)
            self._has_loaded = True
        elif self._resume:
            # a path the user named: unreadable is an error, never a silent fallback
            self._checkpoint_cache = (self._load_from, check_training_checkpoint(self._load_from))
            self.resume(self._load_from)
            self._has_loaded = True
        elif self._load_from is not None:
            self.load_checkpoint(self._load_from)
            self._has_loaded = True

    def load_checkpoint(self, filename: str, map_location="cpu", strict: bool = False,
                        revise_keys: list = [(r"^module.", "")]):  # noqa: B006 (mmengine's signature)
        """Load ``filename`` into the model; its weights must fit exactly unless ``allow_partial_load``."""
        cached, self._checkpoint_cache = self._checkpoint_cache, None
        if cached is not None and cached[0] == filename:
            checkpoint = cached[1]
        else:
            checkpoint = read_checkpoint(filename, trusted=True, map_location=map_location)
        model = self.model.module if is_model_wrapper(self.model) else self.model
        self.call_hook("after_load_checkpoint", checkpoint=checkpoint)  # EMA swaps its weights in here
        partial = bool(self.cfg.get("allow_partial_load", False))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_weights(model, state_dict_of(checkpoint, filename), filename, allow_partial=partial,
                         hint="set allow_partial_load=True in the config (--cfg-options allow_partial_load=True)")
        for w in caught:
            self.logger.warning(str(w.message))
        self._has_loaded = True
        self.logger.info(f"Load checkpoint from {filename}")
        return checkpoint

    def save_checkpoint(self, out_dir: str, filename: str, *args, **kwargs):
        """mmengine's checkpoint, written to a temporary name and renamed once it is on disk."""
        if not is_main_process():
            return super().save_checkpoint(out_dir, filename, *args, **kwargs)  # master_only: a no-op
        tmp = f".{filename}.partial"
        try:
            super().save_checkpoint(out_dir, tmp, *args, **kwargs)
            final = osp.join(out_dir, filename)
            # durable rename: the bytes first, then the name, then the folder entry
            fd = os.open(osp.join(out_dir, tmp), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(osp.join(out_dir, tmp), final)
            fd = os.open(out_dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            if osp.exists(osp.join(out_dir, tmp)):
                os.remove(osp.join(out_dir, tmp))


@HOOKS.register_module()
class BoxLossCheckpointHook(CheckpointHook):
    """mmengine's ``CheckpointHook`` writing ``last_checkpoint`` atomically and durably."""

    # adapted from mmengine 0.10.7, CheckpointHook._save_checkpoint_with_step: same pruning and
    # saving; only the last_checkpoint write differs (it was open(..., "w"), torn by a crash)
    def _save_checkpoint_with_step(self, runner, step, meta):
        if self.max_keep_ckpts > 0:
            if not (len(self.keep_ckpt_ids) > 0 and self.keep_ckpt_ids[-1] == step):
                if len(self.keep_ckpt_ids) == self.max_keep_ckpts:
                    old_step = self.keep_ckpt_ids.popleft()
                    if is_main_process():
                        old = self.file_backend.join_path(self.out_dir, self.filename_tmpl.format(old_step))
                        if self.file_backend.isfile(old):
                            self.file_backend.remove(old)
                        elif self.file_backend.isdir(old):
                            self.file_backend.rmtree(old)
                self.keep_ckpt_ids.append(step)
                runner.message_hub.update_info("keep_ckpt_ids", list(self.keep_ckpt_ids))
        ckpt_filename = self.filename_tmpl.format(step)
        self.last_ckpt = self.file_backend.join_path(self.out_dir, ckpt_filename)
        runner.message_hub.update_info("last_ckpt", self.last_ckpt)
        runner.save_checkpoint(
            self.out_dir, ckpt_filename, self.file_client_args, save_optimizer=self.save_optimizer,
            save_param_scheduler=self.save_param_scheduler, meta=meta, by_epoch=self.by_epoch,
            backend_args=self.backend_args, **self.args,
        )
        if is_main_process():
            atomic_text(osp.join(runner.work_dir, "last_checkpoint"), self.last_ckpt, durable=True)

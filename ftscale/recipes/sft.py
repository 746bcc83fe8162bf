"""The supervised fine-tuning recipe: one training script for every method and every backend.

Shape (as torchtune's recipes): setup() -> _setup_data(), _setup_model(), _setup_optimizer(), _resume(); then
train(), evaluate(), save_checkpoint(), save_adapter(), cleanup(); `recipe_main(cfg)` runs them. Accelerate
supplies the process group and the backend (one process, DDP, DeepSpeed ZeRO) chosen by `accelerate launch
--config_file`; FSDP2, chosen the same way, is applied by ftscale/distributed/fsdp.py."""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate.utils import set_seed

from ftscale.atomic_files import partial_folder, replace_folder, write_text_atomically
from ftscale.checkpoint import CheckpointStore, Preempted, PreemptionWatcher
from ftscale.checkpoint.state import state_access
from ftscale.config import ConfigError, FtscaleConfig, render_config
from ftscale.data import build_datasets, collate, describe
from ftscale.distributed.accelerator import build_accelerator
from ftscale.distributed.fsdp import (
    fsdp_settings,
    full_tensor,
    full_trainable_state_dict,
    full_values,
    load_from_rank0,
    reshard_all,
    shard_model,
    unsharded_for_saving,
)
from ftscale.distributed.zero import (
    configure_deepspeed,
    frozen_bytes_on_this_rank,
    gathered,
    hidden_from_transformers,
    is_deepspeed,
    partition_from_rank0,
    zero_stage,
)
from ftscale.errors import FtscaleError
from ftscale.methods import (
    attach_adapter,
    check_saved_adapter,
    save_adapter,
    save_adapter_config,
    trainable_parameter_count,
)
from ftscale.model.loading import load_base_model, load_tokenizer
from ftscale.model.quantized_skeleton import match_rank0_quantized_layout
from ftscale.training.metrics import MetricLogger
from ftscale.training.optim import build_optimizer, build_scheduler

log = logging.getLogger("ftscale")


class TrainingDiverged(FtscaleError, FloatingPointError):
    """The loss became NaN or infinite: a setting to change, not a bug to report."""


# Methods whose base every FSDP2 rank reads itself: peft's prompt learning keeps a second reference to the input
# embedding, which FSDP2 does not shard and rank 0 could not fill.
READ_ON_EVERY_RANK = {"prompt_tuning", "prefix_tuning", "p_tuning"}


class SFTRecipe:
    def __init__(self, cfg: FtscaleConfig):
        self.cfg = cfg
        self.out = Path(cfg.training.output_dir)
        self.history: list[dict[str, float]] = []
        self._order: list[int] = []  # this epoch's row order (see _micro_batches)
        self._order_epoch: int | None = None

    # ---- setup -------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.accelerator = build_accelerator(cfg)
        logging.basicConfig(
            level=logging.INFO if self.accelerator.is_main_process else logging.WARNING,
            format=f"%(asctime)s [rank {self.accelerator.process_index}] %(message)s",
            datefmt="%H:%M:%S",
        )
        debug = cfg.logging.level == "debug" and self.accelerator.is_main_process
        log.setLevel(logging.DEBUG if debug else logging.NOTSET)  # debug: ftscale's own detail, not every library's
        acc = self.accelerator
        if acc.is_main_process:  # first: it is what a user inspects when a run fails
            self.out.mkdir(parents=True, exist_ok=True)
            write_text_atomically(self.out / "config.yaml", render_config(cfg))
        self.fsdp = fsdp_settings()
        if is_deepspeed(acc):  # before the model: ZeRO-3 loading reads this config too
            configure_deepspeed(acc, cfg.training, cfg.distributed)
        backend = "FSDP2" if self.fsdp is not None else acc.distributed_type.value
        log.info("backend %s: %d processes, device %s", backend, acc.num_processes, acc.device)
        set_seed(cfg.training.seed)
        self.preemption = PreemptionWatcher()
        self._setup_data()
        self._setup_model()
        self._setup_optimizer()
        self._resume()
        self.metrics = MetricLogger(cfg, self.accelerator.is_main_process, self.total_steps, self.run_id)

    def _setup_data(self) -> None:
        cfg = self.cfg
        self.tokenizer, self.added_tokens = load_tokenizer(cfg.model)
        self.train_rows, self.eval_rows, self.train_stats = build_datasets(cfg.data, self.tokenizer, cfg.training.seed)
        t = cfg.training
        self.rows_per_step = t.micro_batch_size * self.accelerator.num_processes * t.gradient_accumulation_steps
        self.steps_per_epoch = len(self.train_rows) // self.rows_per_step
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"{len(self.train_rows)} training rows cannot fill one optimizer step of {self.rows_per_step} rows "
                "(micro_batch_size x processes x gradient_accumulation_steps): lower those or add data"
            )
        self.total_steps = t.max_steps or self.steps_per_epoch * t.epochs
        log.info(
            "data: %s -> %d training rows (packing=%s), %d held-out rows",
            describe(self.train_stats), len(self.train_rows), cfg.data.packing, len(self.eval_rows),
        )

    def _setup_model(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        vocab, device = (len(self.tokenizer) if self.added_tokens else None), acc.device
        from_rank0, zero3 = self._reads_on_rank0_only(), zero_stage(acc) == 3
        # ZeRO-3 with a 4-bit base: ftscale partitions it below; transformers would refuse the meta device_map.
        with hidden_from_transformers(acc) if from_rank0 and zero3 else nullcontext():
            model = load_base_model(cfg, device, vocab_size=vocab, empty=from_rank0 and not acc.is_main_process)
        if from_rank0 and cfg.method.name == "qlora":
            match_rank0_quantized_layout(model, device)
        if from_rank0 and zero3:
            partition_from_rank0(model, acc)
        if zero3:
            partitioned = all(hasattr(p, "ds_id") for p in model.parameters())
            log.info("ZeRO-3: the base was %s", "partitioned while loading" if partitioned else "read whole, partitioned at prepare")
        model = attach_adapter(model, cfg)
        if cfg.training.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.fsdp is not None:
            values = full_values(model) if from_rank0 and acc.is_main_process else {}
            model = shard_model(model, self.fsdp, device)
            if from_rank0:
                load_from_rank0(model, values, device)
                del values
        if from_rank0:
            log.info("rank 0 read the base; %d other rank(s) received only their shards", acc.num_processes - 1)
        trainable, total = trainable_parameter_count(model)
        log.info("method %s: %d trainable of %d parameters (%.3f%%)", cfg.method.name, trainable, total, 100 * trainable / total)
        self.model = model

    def _reads_on_rank0_only(self) -> bool:
        """Memory-efficient loading done here: rank 0 reads the weights; the other ranks build the model on the meta
        device and receive only their shards. Under ZeRO-3 transformers does this itself, except for 4-bit bases."""
        method, acc = self.cfg.method.name, self.accelerator
        if acc.num_processes == 1:
            return False
        if self.fsdp is not None:
            return self.fsdp.ram_efficient_loading and method not in READ_ON_EVERY_RANK
        if zero_stage(acc) == 3:
            return acc.state.deepspeed_plugin.zero3_init_flag and method == "qlora"
        return False

    def _setup_optimizer(self) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, self.cfg.training, self.accelerator.device)
        # The scheduler stays outside accelerate.prepare: it is stepped exactly once per optimizer step.
        if self.fsdp is not None:  # already sharded: prepare would wrap the model in DDP
            self.optimizer = self.accelerator.prepare(optimizer)
        else:
            self.model, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        local, full = frozen_bytes_on_this_rank(self.accelerator.unwrap_model(self.model))
        log.info("frozen base: %d of %d bytes held by rank %d", local, full, self.accelerator.process_index)
        self.scheduler = build_scheduler(optimizer, self.cfg.training, self.total_steps)
        self.state_access = state_access(self.optimizer, self.accelerator, self.model)  # what checkpoints read and write

    def _resume(self) -> None:
        """Continue from a checkpoint (checkpoint.resume): parameters, optimizer, schedule, RNG and data position."""
        self.store = CheckpointStore(self.cfg, self.accelerator)
        self.start_step, self.tokens_seen, self.eval_loss_before = 0, 0, None
        ckpt = self.store.find_resume()
        if ckpt is not None:
            state = self.store.load(
                ckpt, self.accelerator.unwrap_model(self.model), self.state_access, self.scheduler,
                self.rows_per_step, len(self.train_rows),
            )
            self.start_step, self.tokens_seen = state["step"], state["tokens_seen"]
            self.history, self.eval_loss_before = state["history"], state["eval_loss_before"]
            if self.start_step > self.total_steps:
                raise ConfigError(
                    f"{ckpt.path} is at step {self.start_step}, past this run's {self.total_steps} steps: raise "
                    "training.max_steps, or set checkpoint.resume to an earlier checkpoint"
                )
        self.run_id = self.store.start(ckpt)
        self.store.clear_preempted()

    # ---- data order --------------------------------------------------------------------------------------------
    def _micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches for optimizer step `step`.

        The global order is a seeded permutation per epoch; micro-batch k of a step is a contiguous slice of it,
        split by rank. So N processes with batch B see exactly the rows one process with batch N*B sees."""
        t, acc = self.cfg.training, self.accelerator
        epoch, index = divmod(step, self.steps_per_epoch)
        if self._order_epoch != epoch:  # one permutation per epoch, not per step
            generator = torch.Generator().manual_seed(t.seed + epoch)
            self._order, self._order_epoch = torch.randperm(len(self.train_rows), generator=generator).tolist(), epoch
        order = self._order
        batches = []
        for k in range(t.gradient_accumulation_steps):
            start = (index * t.gradient_accumulation_steps + k) * t.micro_batch_size * acc.num_processes
            start += acc.process_index * t.micro_batch_size
            rows = [self.train_rows[i] for i in order[start : start + t.micro_batch_size]]
            batches.append(collate(rows, self.tokenizer.pad_token_id, self.cfg.data.packing))
        return batches

    # ---- loop --------------------------------------------------------------------------------------------------
    def _global_sum(self, value: float) -> float:
        t = torch.tensor(float(value), device=self.accelerator.device, dtype=torch.float64)
        return self.accelerator.reduce(t, reduction="sum").item()

    def _agree(self, *flags: bool) -> list[bool]:
        """Whether any rank raised each flag (signals and clocks differ between ranks; the decision must not)."""
        t = torch.tensor([float(f) for f in flags], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def train(self) -> None:
        cfg, acc, ck = self.cfg, self.accelerator, self.cfg.checkpoint
        if self.eval_loss_before is None:
            self.eval_loss_before = self.evaluate()
        self.model.train()
        resumed_tokens, session_tokens, t0, last_save = self.tokens_seen, 0, time.monotonic(), time.monotonic()
        for step in range(self.start_step, self.total_steps):
            batches = self._micro_batches(step)
            counts = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
            # Normalise by the loss tokens of the whole optimizer step on all ranks, so the gradient is the same
            # however the step is split into micro-batches and processes (DDP averages over processes).
            step_tokens = self._global_sum(sum(counts))
            loss_sum = 0.0
            for k, (batch, count) in enumerate(zip(batches, counts)):
                if self.fsdp is not None:  # reduce-scatter gradients once per step, after the last micro-batch
                    self.model.set_requires_gradient_sync(k == len(batches) - 1)
                # accumulate() syncs gradients (DDP) or marks the boundary (DeepSpeed) on the last micro-batch.
                with acc.accumulate(self.model):
                    out = self.model(**{n: v.to(acc.device) for n, v in batch.items()}, use_cache=False)
                    # backward() divides by the accumulation steps (as DeepSpeed's engine does); the token
                    # normalisation already covers every micro-batch, so that division is undone here.
                    accum = cfg.training.gradient_accumulation_steps
                    acc.backward(out.loss * (count * acc.num_processes * accum / step_tokens))
                loss_sum += out.loss.detach().item() * count
                session_tokens += batch["input_ids"].numel()
            grad_norm = None
            if cfg.training.max_grad_norm is not None:
                grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.training.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._global_sum(loss_sum) / step_tokens
            record = {"train/loss": loss, "train/lr": self.scheduler.get_last_lr()[0]}
            if grad_norm is not None:
                record["train/grad_norm"] = float(full_tensor(grad_norm))
            step_tokens_all = self._global_sum(session_tokens)
            record["train/tokens_per_s"] = step_tokens_all / (time.monotonic() - t0)
            self.history.append({"step": step + 1, **record})
            if not math.isfinite(loss):
                raise TrainingDiverged(f"loss became {loss} at step {step + 1}: lower training.learning_rate or check the data")
            done = step + 1 == self.total_steps
            if cfg.training.eval_every and (step + 1) % cfg.training.eval_every == 0 and not done and self.eval_rows:
                record["eval/loss"] = self.evaluate()
                self.model.train()
            if (step + 1) % cfg.training.log_every == 0 or done:
                self.metrics.log(step + 1, record)

            self.tokens_seen = resumed_tokens + step_tokens_all
            by_time = ck.every_minutes is not None and time.monotonic() - last_save >= 60 * ck.every_minutes
            preempt, timed = self._agree(self.preemption.received is not None, by_time)
            if preempt:
                path = self.save_checkpoint(step + 1)
                signal_name = self.preemption.received or "a signal on another rank"
                self.store.mark_preempted({"step": step + 1, "signal": signal_name, "checkpoint": str(path)})
                raise Preempted(step + 1, signal_name, str(path))
            if not done and (timed or (ck.every_steps and (step + 1) % ck.every_steps == 0)):
                self.save_checkpoint(step + 1)
                last_save = time.monotonic()
        self.eval_loss_after = self.evaluate()
        if self.eval_loss_after is not None:
            self.metrics.log(self.total_steps, {"eval/loss": self.eval_loss_after})
        if self.start_step < self.total_steps:  # a finished run started again resumed from this very checkpoint
            self.save_checkpoint(self.total_steps)

    def save_checkpoint(self, step: int):
        model = self.accelerator.unwrap_model(self.model)
        epoch, index = divmod(step, self.steps_per_epoch)
        state = {
            "step": step,
            # The data position: the order within an epoch is a seeded permutation, so (epoch, offset) is exact.
            "epoch": epoch,
            "sample_offset": index * self.rows_per_step,
            "rows_per_step": self.rows_per_step,
            "world_size": self.accelerator.num_processes,
            "num_train_rows": len(self.train_rows),
            "history": self.history,
            "eval_loss_before": self.eval_loss_before,
            "tokens_seen": self.tokens_seen,
        }
        return self.store.save(
            step, model, self.state_access, self.scheduler, state,
            lambda out: save_adapter_config(model, out, self.cfg),
        )

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Token-weighted held-out loss over all ranks (None without eval data)."""
        if not self.eval_rows:
            return None
        acc, mb = self.accelerator, self.cfg.training.micro_batch_size
        self.model.eval()
        shard = self.eval_rows[acc.process_index :: acc.num_processes]
        # Every rank runs the same number of forwards (sharded backends need it); short shards repeat a row at weight 0.
        n_batches = math.ceil(math.ceil(len(self.eval_rows) / acc.num_processes) / mb)
        loss_sum = count_sum = 0.0
        for i in range(n_batches):
            rows = shard[i * mb : (i + 1) * mb]
            weight = 1.0 if rows else 0.0
            batch = collate(rows or self.eval_rows[:1], self.tokenizer.pad_token_id, self.cfg.data.packing)
            out = self.model(**{n: v.to(acc.device) for n, v in batch.items()}, use_cache=False)
            count = int((batch["labels"][:, 1:] != -100).sum()) * weight
            loss_sum += out.loss.item() * count
            count_sum += count
        if self.fsdp is not None:
            reshard_all(self.model)
        return self._global_sum(loss_sum) / self._global_sum(count_sum)

    # ---- outputs -----------------------------------------------------------------------------------------------
    def save_adapter(self) -> Path:
        """Write the adapter from rank 0. Under ZeRO-3 and FSDP2 only the trainable parameters are gathered for it."""
        out = self.out / "adapter"
        model = self.accelerator.unwrap_model(self.model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.accelerator.wait_for_everyone()
        with gathered(trainable, self.accelerator), unsharded_for_saving(model):
            state = full_trainable_state_dict(model) if self.fsdp is not None else None
            if self.accelerator.is_main_process:  # built aside and checked, then moved into place whole
                tmp = partial_folder(out)
                save_adapter(model, tmp, self.cfg, state_dict=state)
                self.tokenizer.save_pretrained(tmp)
                check_saved_adapter(tmp, {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad})
                replace_folder(tmp, out)
        self.accelerator.wait_for_everyone()
        return out

    def write_summary(self) -> dict:
        s = self.train_stats
        summary = {
            "method": self.cfg.method.name,
            "steps": self.total_steps,
            "eval_loss_before": self.eval_loss_before,
            "eval_loss_after": self.eval_loss_after,
            "final_train_loss": self.history[-1]["train/loss"] if self.history else None,
            "tokens_per_s": self.history[-1]["train/tokens_per_s"] if self.history else None,
            "data": {"examples": s.examples, "rows": len(self.train_rows), "skipped": s.skipped, "truncated": s.truncated, "dropped": s.dropped},
            "history": self.history,
        }
        if self.accelerator.is_main_process:
            write_text_atomically(self.out / "summary.json", json.dumps(summary, indent=2))
        self.metrics.finish({k: v for k, v in summary.items() if isinstance(v, float)})
        return summary

    def cleanup(self) -> None:
        if hasattr(self, "metrics"):
            self.metrics.close()
        if hasattr(self, "preemption"):
            self.preemption.close()
        if hasattr(self, "accelerator"):
            self.accelerator.end_training()


def recipe_main(cfg: FtscaleConfig) -> dict:
    """Run the whole recipe. Raises `Preempted` after checkpointing when SIGUSR1/SIGTERM arrived."""
    recipe = SFTRecipe(cfg)
    try:
        recipe.setup()
        recipe.train()
        if cfg.checkpoint.save_final_adapter:
            recipe.save_adapter()
        return recipe.write_summary()
    finally:
        recipe.cleanup()

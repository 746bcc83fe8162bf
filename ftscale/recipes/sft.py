"""The supervised fine-tuning recipe: one training script for every method and every backend.

Shape (as torchtune's recipes, with torchtitan's step split): setup() -> _setup_data(), _setup_model(),
_setup_optimizer(), _setup_checkpoints(); then train() -> train_step() -> forward_backward(); evaluate(),
save_adapter(), write_summary(), cleanup(); `recipe_main(cfg)` runs them. The backend (one process, DDP, FSDP2,
DeepSpeed ZeRO), chosen by `accelerate launch --config_file`, is behind ftscale.distributed's `Backend`: this file
never names one."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed

from ftscale.atomic_files import partial_folder, replace_folder, write_text_atomically
from ftscale.checkpoint import CheckpointStore, PreemptionWatcher, TrainerState
from ftscale.config import ConfigError, FtscaleConfig, render_config
from ftscale.data import Row, StepSampler, build_datasets, collate, describe
from ftscale.data.sampler import StepTotals
from ftscale.distributed.accelerator import build_accelerator
from ftscale.distributed.backend import build_backend
from ftscale.distributed.launch import read_launch_settings
from ftscale.errors import FtscaleError
from ftscale.evaluation.generation import count_exact_matches, prompts_and_answers
from ftscale.evaluation.heldout import summed_loss
from ftscale.methods import attach_adapter, check_saved_adapter, save_adapter, save_adapter_config
from ftscale.model.auto_settings import DeviceCapabilities, resolve_auto
from ftscale.model.kernels import apply_liger_kernels, compile_decoder_layers, use_fast_cpu_dropout, use_fused_cpu_lora
from ftscale.model.loading import load_tokenizer
from ftscale.observability.flops import device_peak_flops, model_flops
from ftscale.observability.logger import MetricLogger
from ftscale.observability.run_info import run_info
from ftscale.observability.step_metrics import LocalStep, MetricsWindow, Stopwatch, reduce_step
from ftscale.training.activation_offload import saved_activations
from ftscale.training.host_memory import reuse_freed_host_memory
from ftscale.training.loss import loss_on_labelled_positions, model_loss, training_loss
from ftscale.training.optim import build_optimizer, build_scheduler

log = logging.getLogger("ftscale")


class TrainingDiverged(FtscaleError, FloatingPointError):
    """The loss became NaN or infinite: a setting to change, not a bug to report."""


class SFTRecipe:
    def __init__(self, cfg: FtscaleConfig):
        self.cfg, self.auto_choices = resolve_auto(cfg, DeviceCapabilities.detect())  # before anything is built
        self.out = Path(cfg.training.output_dir)
        self.state = TrainerState()  # what a checkpoint saves of where training stands
        self.eval_loss_after: float | None = None

    @property
    def history(self) -> list[dict[str, float]]:
        return self.state.history

    @property
    def eval_loss_before(self) -> float | None:
        return self.state.eval_loss_before

    # ---- setup -------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        launch = read_launch_settings()
        self.accelerator = acc = build_accelerator(cfg, launch)
        logging.basicConfig(
            level=logging.INFO if acc.is_main_process else logging.WARNING,
            format=f"%(asctime)s [rank {acc.process_index}] %(message)s",
            datefmt="%H:%M:%S",
        )
        debug = cfg.logging.level == "debug" and acc.is_main_process
        log.setLevel(logging.DEBUG if debug else logging.NOTSET)  # debug: ftscale's own detail, not every library's
        if acc.is_main_process:  # first: it is what a user inspects when a run fails
            self.out.mkdir(parents=True, exist_ok=True)
            write_text_atomically(self.out / "config.yaml", render_config(cfg))
        self.backend = build_backend(launch, acc, cfg)
        log.info("backend %s: %d processes, device %s", self.backend.name, acc.num_processes, acc.device)
        if self.auto_choices:
            log.info("auto settings for this device: %s", ", ".join(self.auto_choices))
        if cfg.training.reuse_host_memory and acc.device.type == "cpu" and acc.num_processes == 1:
            log.info("training.reuse_host_memory: %s", reuse_freed_host_memory(launch.allocator))
        set_seed(cfg.training.seed)
        self.preemption = PreemptionWatcher()
        self._setup_data()
        self._setup_model()
        self._setup_optimizer()
        self._setup_loss()
        self._setup_checkpoints()
        self._setup_metrics()

    def _setup_data(self) -> None:
        cfg, acc, t = self.cfg, self.accelerator, self.cfg.training
        self.tokenizer, self.added_tokens = load_tokenizer(cfg.model)
        data = build_datasets(cfg.data, self.tokenizer, t.seed, acc.process_index)
        self.train_rows, self.eval_rows, self.train_stats = data.train, data.eval, data.stats
        self.sampler = StepSampler(
            self.train_rows, t.micro_batch_size, t.gradient_accumulation_steps, acc.process_index, acc.num_processes, t.seed
        )
        if self.sampler.steps_per_epoch == 0:
            raise ConfigError(
                f"{len(self.train_rows)} training rows cannot fill one optimizer step of {self.sampler.rows_per_step} rows "
                "(micro_batch_size x processes x gradient_accumulation_steps): lower those or add data"
            )
        self.total_steps = t.max_steps or self.sampler.steps_per_epoch * t.epochs
        for line in data.mixture if len(data.mixture) > 1 else []:
            log.info("mix: %s", line)
        log.info(
            "data: %s -> %d training rows (packing=%s, %.1f%% full), %d held-out rows",
            describe(self.train_stats),
            len(self.train_rows),
            cfg.data.packing and cfg.data.packer,
            100 * self.train_rows.fill(cfg.data.max_seq_len),
            len(self.eval_rows or ()),
        )

    def _setup_model(self) -> None:
        cfg = self.cfg
        model = self.backend.load_base(len(self.tokenizer) if self.added_tokens else None)
        self.fused_loss = apply_liger_kernels(model) if cfg.model.liger_kernels else None
        model = attach_adapter(model, cfg)
        cpu = self.accelerator.device.type == "cpu"
        if cpu and cfg.training.fast_cpu_dropout:
            log.info("training.fast_cpu_dropout: %d dropout modules draw their masks in bulk", use_fast_cpu_dropout(model))
        if cpu and cfg.training.fused_cpu_lora:
            log.info("training.fused_cpu_lora: %d LoRA layers add their product in one matmul where they can", use_fused_cpu_lora(model))
        if cfg.training.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.training.compile:
            log.info("training.compile: %d decoder layers compiled (the first steps compile them)", compile_decoder_layers(model))
        self.model = self.backend.parallelize(model)
        trainable, total = self.backend.parameter_counts(self.model)
        self.trainable = trainable
        log.info("method %s: %d trainable of %d parameters (%.3f%%)", cfg.method.name, trainable, total, 100 * trainable / total)

    def _setup_optimizer(self) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, self.cfg.training, self.accelerator.device)
        self.model, self.optimizer = self.backend.prepare(self.model, optimizer)
        local, full = self.backend.frozen_bytes(self.accelerator.unwrap_model(self.model))
        log.info("frozen base: %d of %d bytes held by rank %d", local, full, self.accelerator.process_index)
        # The scheduler stays outside accelerate.prepare: it is stepped exactly once per optimizer step.
        self.scheduler = build_scheduler(optimizer, self.cfg.training, self.total_steps)

    def _setup_loss(self) -> None:
        """After the backend's prepare: its hooks on the output head must come before the loss's (training_loss)."""
        model = self.accelerator.unwrap_model(self.model)
        self.loss, how = training_loss(model, self.cfg.training, self.cfg.method.name, self.fused_loss, self.backend.allows_empty_head)
        log.info("loss: %s", how)
        # Evaluation (no gradient, so no logits kept) needs no chunks, nor a hook on this very model's head.
        self.eval_loss = model_loss if self.loss is model_loss else loss_on_labelled_positions
        self.flops = model_flops(model, model.config, self.trainable, head_on_labels_only=self.loss is not model_loss)

    def _setup_checkpoints(self) -> None:
        """The checkpoint store, and the resume from a checkpoint (checkpoint.resume): parameters, optimizer,
        schedule, RNG and data position."""
        model = self.accelerator.unwrap_model(self.model)
        self.store = CheckpointStore(
            self.cfg,
            self.accelerator,
            self.backend.state_access(model, self.optimizer),
            self.scheduler,
            lambda folder: save_adapter_config(model, folder, self.cfg),
            self.sampler,
            self.preemption,
        )
        ckpt = self.store.find_resume()
        if ckpt is not None:
            self.state = self.store.load(ckpt)
            if self.state.step > self.total_steps:
                raise ConfigError(
                    f"{ckpt.path} is at step {self.state.step}, past this run's {self.total_steps} steps: raise "
                    "training.max_steps, or set checkpoint.resume to an earlier checkpoint"
                )
        self.run_id = self.store.start(ckpt)
        self.resumed_step = None if ckpt is None else self.state.step

    def _setup_metrics(self) -> None:
        """The logging window (MFU against every device's peak together) and the metrics' destinations."""
        acc = self.accelerator
        acc.wait_for_everyone()  # CPU ranks sharing a machine measure together: each gets its share of the cores
        peak, source = device_peak_flops(acc.device, self.cfg.logging.peak_flops)
        (total_peak,) = self._sum_over_ranks(peak)
        log.info("MFU is against %.4g FLOP/s per device (%s), %.4g in all", peak, source, total_peak)
        self.window = MetricsWindow(
            self.flops, total_peak, acc.num_processes, self.sampler.steps_per_epoch, self.sampler.examples_before(self.state.step)
        )
        t = self.cfg.training
        self.answer_prompts = prompts_and_answers(self.eval_rows, t.eval_generate_examples) if self.eval_rows else []
        if t.eval_generate_examples and not self.answer_prompts:
            raise ConfigError(
                f"training.eval_generate_examples={t.eval_generate_examples}: no held-out example has a prompt before "
                "its answer (it needs chat or prompt/completion data trained on the answer only, in data.eval or "
                "data.eval_fraction); set it to 0"
            )
        info = run_info(acc.device, acc.num_processes) if acc.is_main_process else {}
        self.metrics = MetricLogger(self.cfg, acc.is_main_process, self.total_steps, self.state.step, self.run_id, self.resumed_step, info)

    # ---- one step ----------------------------------------------------------------------------------------------
    def forward_backward(self, batch: dict[str, torch.Tensor], loss_tokens: int, scale: float) -> torch.Tensor:
        """One micro-batch of `loss_tokens` labelled tokens: forward, then backward of its mean token loss times
        `scale`; returns that mean, detached and on the device (reading it would make the host wait for the device
        on every micro-batch)."""
        acc = self.accelerator
        inputs = {n: v.to(acc.device) for n, v in batch.items()}
        with saved_activations(self.cfg.training.activation_offloading):
            loss = self.loss(self.model, inputs, loss_tokens)
        acc.backward(loss * scale)
        return loss.detach()

    def _collate(self, rows: list[Row]) -> dict[str, torch.Tensor]:
        return collate(rows, self.tokenizer.pad_token_id, self.cfg.data.packing, self.cfg.data.padding_free)

    def train_step(self, step: int) -> tuple[LocalStep, StepTotals]:
        """Optimizer step `step` (0-based) on this rank's micro-batches; returns what this rank measured, and the
        step's data on all ranks."""
        acc, t = self.accelerator, self.cfg.training
        waited = time.perf_counter()
        micro_batches = self.sampler.micro_batches(step)
        data_wait = time.perf_counter() - waited
        # Normalise by the loss tokens of the whole optimizer step on all ranks, so the gradient is the same however
        # the step is split into micro-batches and processes. Every backend averages gradients over processes and
        # accelerate's backward() divides by the accumulation steps: both are undone here.
        totals = self.sampler.step_totals(step)
        step_tokens = totals.loss_tokens
        loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
        nonfinite = torch.zeros((), dtype=torch.int64, device=acc.device)
        batch_tokens = 0
        for k, rows in enumerate(micro_batches):
            waited = time.perf_counter()
            batch, count = self._collate(rows), sum(r.loss_tokens for r in rows)
            data_wait += time.perf_counter() - waited
            with self.backend.micro_batch(self.model, k, len(micro_batches)):
                loss = self.forward_backward(batch, count, count * acc.num_processes * t.gradient_accumulation_steps / step_tokens)
            loss_sum += loss.double() * count
            nonfinite += ~torch.isfinite(loss)
            batch_tokens += batch["input_ids"].numel()
        norm = self.backend.clip_grad_norm(self.model, t.max_grad_norm) if t.max_grad_norm is not None else None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return LocalStep(loss_sum, nonfinite, batch_tokens, data_wait, norm), totals

    def _sum_over_ranks(self, *values: float) -> list[float]:
        """One all-reduce for several scalars (float64: token counts stay exact)."""
        return self._all_reduce(torch.tensor(values, dtype=torch.float64)).tolist()

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t.to(self.accelerator.device), reduction="sum")

    # ---- loop --------------------------------------------------------------------------------------------------
    def train(self) -> None:
        t, acc, window = self.cfg.training, self.accelerator, self.window
        clock = Stopwatch(acc.device)
        if self.state.step == 0 and self.eval_rows:  # the held-out figures before training (a resumed run has them)
            evaluated = self.evaluate()
            self.state.eval_loss_before = evaluated["eval/loss"]
            self.state.history.append({"step": 0, **evaluated})
            window.add_time("eval", clock.elapsed())
            self.metrics.log(0, {**evaluated, **window.record(0)})
        self.model.train()
        start = self.state.step
        self.store.start_clock()  # checkpoint.every_minutes counts training time, not set-up or the first evaluation
        for step in range(start, self.total_steps):
            clock.start()
            local, totals = self.train_step(step)
            local.compute_s = clock.elapsed()
            # The step's figures from every rank and every rank's checkpoint triggers, in one all-reduce.
            reduced = reduce_step(local, self.store.local_triggers(), acc.process_index, acc.num_processes, acc.device, self._all_reduce)
            loss, lr = reduced.loss_sum / totals.loss_tokens, self.scheduler.get_last_lr()[0]
            window.add_step(reduced, totals, clock.elapsed(), lr, local.grad_norm)
            self.state.step, self.state.tokens_seen = step + 1, self.state.tokens_seen + totals.tokens
            record = {"step": step + 1, "train/loss": loss, "train/lr": lr}
            if local.grad_norm is not None:
                record["train/grad_norm"] = local.grad_norm
            self.state.history.append(record)
            self.metrics.step_done()
            last, preempted, timed = step + 1 == self.total_steps, reduced.preempted, reduced.timed
            evaluated = {}
            if not math.isfinite(loss):
                self.metrics.log(step + 1, window.record(step + 1))
                raise TrainingDiverged(f"loss became {loss} at step {step + 1}: lower training.learning_rate or check the data")
            if self.eval_rows and (last or (t.eval_every and (step + 1) % t.eval_every == 0)):
                clock.start()
                evaluated = self.evaluate()
                record.update(evaluated)
                window.add_time("eval", clock.elapsed())
                self.model.train()
                # A signal (or the save clock) that came during the evaluation counts now, not a step later.
                preempted, timed = (v > 0 for v in self._sum_over_ranks(*self.store.local_triggers()))
            clock.start()
            try:
                if last:  # after the final evaluation, so that it holds the final figures
                    self.store.save(self.state)
                else:
                    self.store.maybe_save(self.state, preempted=preempted, timed=timed)
            finally:  # a preemption's save raises Preempted: the steps before it are logged all the same
                window.add_time("checkpoint", clock.elapsed())
                if (step + 1) % t.log_every == 0 or evaluated or last or preempted:  # evaluations are always logged
                    clock.start()
                    self.metrics.log(step + 1, {**window.record(step + 1), **evaluated})
                    window.add_time("logging", clock.elapsed())
        if start < self.total_steps:
            self.eval_loss_after = self.state.history[-1].get("eval/loss")
        else:  # a finished run started again: nothing trained, its held-out loss is measured again
            self.eval_loss_after = self.evaluate().get("eval/loss")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted held-out loss over all ranks, and exact match when training.eval_generate_examples is set
        (empty without eval data)."""
        if not self.eval_rows:
            return {}
        acc, mb = self.accelerator, self.cfg.training.micro_batch_size
        self.model.eval()
        shard = range(acc.process_index, len(self.eval_rows), acc.num_processes)
        # Every rank runs the same number of forwards (sharded backends need it); short shards repeat a row at weight 0.
        n_batches = math.ceil(math.ceil(len(self.eval_rows) / acc.num_processes) / mb)
        loss_sum = count_sum = 0.0
        for i in range(n_batches):
            rows = [self.eval_rows[r] for r in shard[i * mb : (i + 1) * mb]]
            loss, count = summed_loss(self.model, rows or [self.eval_rows[0]], self._collate, acc.device, self.eval_loss)
            if rows:
                loss_sum, count_sum = loss_sum + loss, count_sum + count
        matches = answered = 0
        if self.cfg.training.eval_generate_examples:
            pairs, model = self.answer_prompts, acc.unwrap_model(self.model)
            shard = range(acc.process_index, len(pairs), acc.num_processes)
            matches, answered = count_exact_matches(
                model, self.tokenizer, pairs, shard, self.cfg.training.eval_generate_max_tokens, acc.device, acc.num_processes > 1
            )
        self.backend.after_eval(self.model)
        loss_sum, count_sum, matches, answered = self._sum_over_ranks(loss_sum, count_sum, matches, answered)
        out = {"eval/loss": loss_sum / count_sum}
        if answered:
            out["eval/exact_match"] = matches / answered
        return out

    # ---- outputs -----------------------------------------------------------------------------------------------
    def save_adapter(self) -> Path:
        """Write the adapter from rank 0; sharding backends gather only the trainable parameters for it."""
        out = self.out / "adapter"
        model = self.accelerator.unwrap_model(self.model)
        self.accelerator.wait_for_everyone()
        with self.backend.trainable_state_for_saving(model) as state:
            if self.accelerator.is_main_process:  # built aside and checked, then moved into place whole
                tmp = partial_folder(out)
                save_adapter(model, tmp, self.cfg, state_dict=state)
                self.tokenizer.save_pretrained(tmp)
                check_saved_adapter(tmp, {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad})
                replace_folder(tmp, out)
                self.metrics.log_adapter(out)
        self.accelerator.wait_for_everyone()
        return out

    def write_summary(self) -> dict:
        s, history = self.train_stats, self.state.history
        summary = {
            "method": self.cfg.method.name,
            "steps": self.total_steps,
            "eval_loss_before": self.state.eval_loss_before,
            "eval_loss_after": self.eval_loss_after,
            "final_train_loss": next((h["train/loss"] for h in reversed(history) if "train/loss" in h), None),
            "data": {
                "examples": s.examples,
                "rows": len(self.train_rows),
                "skipped": s.skipped,
                "truncated": s.truncated,
                "dropped": s.dropped,
            },
            "history": history,
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

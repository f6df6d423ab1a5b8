"""Stage 3: Direct Preference Optimization from an SFT checkpoint (LLM + projector train, vision frozen).

With --lora only the adapters train (the projector stays as SFT left it unless you pass --train_projector with
--precompute_ref), and the reference is the same model with its adapters switched off: no second copy in memory.
A LoRA SFT checkpoint's adapters are merged into the weights first, so the reference is the SFT model and DPO
trains fresh adapters on top of it.

    python dpo_train.py --model_path checkpoints/sft --data_path datasets/RLAIF-V/pairs.parquet \
        --output_dir checkpoints/dpo --beta 0.1

Each pair (image, prompt, chosen, rejected) goes through the model once: chosen and rejected rows share one image
encoding and one forward pass. The reference is a frozen copy of the starting model, or — with --precompute_ref —
its log-probabilities computed in a first pass, so no second model sits in memory while training.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

from settings import DataSettings, StageSettings
from utils import run_stage_from_args, stage_parser


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float = 0.1,
             label_smoothing: float = 0.0, loss_type: str = "sigmoid"):
    """Per-pair (losses, chosen_rewards, rejected_rewards) from summed sequence log-probs.

    sigmoid: -(1 - eps) log sigma(beta h) - eps log sigma(-beta h), h = chosen log-ratio - rejected log-ratio
             (eps = label_smoothing: conservative DPO); ipo: (h - 1 / (2 beta))^2.
    The rewards beta * (log pi - log pi_ref) are detached: they are for logging only.
    """
    import torch.nn.functional as F

    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    margin = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * margin)
                  - label_smoothing * F.logsigmoid(-beta * margin))
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}: use 'sigmoid' or 'ipo'")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def sequence_logps(model, batch: dict):
    """Summed log-probs of each row's supervised tokens (its final reply) and their count; prompts and padding
    carry label -100 and never enter."""
    import torch
    import torch.nn.functional as F

    labels = batch["labels"]
    output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"], labels=labels, image_index=batch.get("image_index"))
    targets = labels[:, 1:]
    supervised = targets != -100
    token_logps = -F.cross_entropy(output.supervised_logits, targets[supervised], reduction="none")
    # Back into (rows, positions), then a plain row sum: index_add would accumulate with CUDA atomics, whose order
    # (and so the last bits of the sums) changes from run to run, and a resumed run must recompute them exactly.
    per_position = torch.zeros(targets.shape, dtype=token_logps.dtype, device=labels.device)
    per_position[supervised] = token_logps
    return per_position.sum(1), supervised.sum(1)


def collate_pairs(samples: list[dict | None], pad_token_id: int) -> dict | None:
    """Chosen rows first, then rejected rows, one padded batch; each image once, indexed by both rows. Skipped
    pairs (None) leave the batch; with none left it is None."""
    import torch

    from data import collate, problem_in

    if problem := problem_in(samples):
        return problem
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    chosen = [{"input_ids": s["input_ids"], "labels": s["labels"], "pixel_values": s["pixel_values"]}
              for s in samples]
    rejected = [{"input_ids": s["rejected_input_ids"], "labels": s["rejected_labels"]} for s in samples]
    batch = collate(chosen + rejected, pad_token_id)
    batch["image_index"] = (torch.arange(len(batch["pixel_values"])).repeat(2)
                            if batch["pixel_values"] is not None else None)
    if "reference_logps" in samples[0]:
        batch["reference_logps"] = torch.stack([s["reference_logps"] for s in samples])
    return batch


def build_preference_dataset(data: DataSettings, processor, validate: bool = True, scan=None):
    from data import PreferenceDataset

    return PreferenceDataset(data.data_path, processor, data.image_dir, data.skip_bad_samples, validate, scan=scan)


@dataclass(frozen=True)
class DPOSettings:
    """The DPO group of flags."""

    beta: float
    label_smoothing: float
    loss_type: str
    sft_weight: float
    precompute_ref: bool


class DPOObjective:
    """The loop's objective for preference pairs: loss summed over pairs (the loop divides by the step's pairs).
    `batch_size` and `num_workers` serve the reference pass of --precompute_ref."""

    def __init__(self, settings: DPOSettings, batch_size: int, num_workers: int):
        self.beta, self.label_smoothing, self.loss_type = settings.beta, settings.label_smoothing, settings.loss_type
        self.sft_weight, self.precompute = settings.sft_weight, settings.precompute_ref
        self.batch_size, self.num_workers = batch_size, num_workers
        self.reference = None

    @classmethod
    def from_settings(cls, settings: StageSettings) -> DPOObjective:
        return cls(settings.stage, settings.run.batch_size, settings.data.num_workers)

    def prepare(self, model, dataset, runtime, collate_fn, autocast) -> None:
        """The reference: the starting model's log-probs precomputed for every pair, or the policy with its LoRA
        adapters switched off, or a frozen copy of the starting model."""
        from lora import adapter_parameters

        if not self.precompute and model.config.lora:
            extra = sorted(set(n for n, p in model.named_parameters() if p.requires_grad)
                           - set(adapter_parameters(model)))
            if extra:
                raise ValueError(f"with LoRA the reference is the model without its adapters, so only adapters may "
                                 f"train, but {extra[:3]} ({len(extra)} tensors) train too: pass "
                                 f"--no-train_projector, or --precompute_ref")
            self.reference = model
            return
        if not self.precompute:
            self.reference = copy.deepcopy(model).requires_grad_(False).eval()
            return
        from functools import partial

        import torch
        from tqdm.auto import tqdm

        from data import Positioned, collate_positioned, raise_problem
        from distributed import all_reduce_sum

        positions = list(range(runtime.rank, len(dataset), runtime.world_size))
        loader = torch.utils.data.DataLoader(Positioned(dataset, positions), batch_size=self.batch_size,
                                             collate_fn=partial(collate_positioned, collate_fn=collate_fn),
                                             num_workers=self.num_workers, generator=torch.Generator())
        table = torch.zeros(len(dataset), 2, device=runtime.device)
        model.eval()
        with torch.no_grad(), autocast:
            for batch_positions, batch in tqdm(loader, desc="reference log-probs", disable=not runtime.is_main):
                batch = raise_problem(batch)
                if batch is None:  # every pair of it skipped as unusable
                    continue
                batch = {k: v.to(runtime.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                logps, _ = sequence_logps(model, batch)
                table[batch_positions] = torch.stack(logps.float().chunk(2), dim=1)
        dataset.reference_logps = all_reduce_sum(table, runtime).cpu()

    @contextmanager
    def reference_mode(self):
        """A frozen copy runs as it is; the LoRA policy runs without adapters and without dropout, then goes back
        to training exactly as it was."""
        from lora import adapters_disabled

        if not self.reference.config.lora or self.reference.training is False:
            yield
            return
        modes = {module: module.training for module in self.reference.modules()}
        self.reference.eval()
        try:
            with adapters_disabled(self.reference):
                yield
        finally:
            for module, mode in modes.items():
                module.train(mode)

    def count(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2

    def __call__(self, model, batch: dict):
        import torch

        logps, lengths = sequence_logps(model, batch)
        policy_chosen, policy_rejected = logps.chunk(2)
        if "reference_logps" in batch:
            ref_chosen, ref_rejected = batch["reference_logps"].unbind(1)
        else:
            with torch.no_grad(), self.reference_mode():
                ref_chosen, ref_rejected = sequence_logps(self.reference, batch)[0].chunk(2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy_chosen, policy_rejected, ref_chosen.to(logps.dtype), ref_rejected.to(logps.dtype), self.beta,
            self.label_smoothing, self.loss_type)
        loss = losses.sum()
        if self.sft_weight:  # RPO-style: keep the chosen answer likely, token-averaged per pair
            loss = loss - self.sft_weight * (policy_chosen / lengths.chunk(2)[0].clamp(min=1)).sum()
        metrics = {"rewards/chosen": chosen_rewards.sum(), "rewards/rejected": rejected_rewards.sum(),
                   "rewards/accuracy": (chosen_rewards > rejected_rewards).float().sum(),
                   "rewards/margin": (chosen_rewards - rejected_rewards).sum()}
        return loss, metrics


def build_parser():
    parser = stage_parser(__doc__.splitlines()[0], lr=1e-6, train_vision=False, train_projector=None,
                          train_llm=True, max_length=2048, batch_size=8, warmup_ratio=0.1,
                          # Pairs share one image encoding and sit in rows of their own: no packing, and the
                          # chosen/rejected collate reads pixels, not cached features; replies are chat turns.
                          without=("--packing", "--cache_vision_features", "--prompt_format"))
    dpo = parser.add_argument_group("DPO")
    dpo.add_argument("--beta", type=float, default=0.1, help="strength of the KL anchor to the reference")
    dpo.add_argument("--label_smoothing", type=float, default=0.0,
                     help="assumed share of flipped preference labels (conservative DPO); sigmoid loss only")
    dpo.add_argument("--loss_type", default="sigmoid", choices=["sigmoid", "ipo"], help="DPO or IPO loss")
    dpo.add_argument("--sft_weight", type=float, default=0.0,
                     help="weight of an extra NLL term on the chosen answer (token mean per pair)")
    dpo.add_argument("--precompute_ref", action="store_true",
                     help="compute the reference log-probs in a first pass instead of keeping a reference model")
    return parser


def parse_args(argv=None) -> StageSettings:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.train_projector is None:  # with LoRA, the adapter-free model is the reference: keep the projector
        args.train_projector = not args.lora
    if args.model_path is None and args.preset is None:
        parser.error("DPO starts from a trained model: give --model_path (an SFT checkpoint)")
    # The starting model is also the reference, so a LoRA checkpoint's adapters are folded into it.
    return StageSettings.from_args(args, stage=DPOSettings, merge_loaded_adapters=True)


def main(argv=None):
    settings = parse_args(argv)
    return run_stage_from_args(settings, build_dataset=build_preference_dataset,
                               objective=DPOObjective.from_settings(settings), collate_fn=collate_pairs)


if __name__ == "__main__":
    main()

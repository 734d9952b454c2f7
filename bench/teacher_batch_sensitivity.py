"""Does the batch an image is computed in change the teacher's output? (why the online teacher
of train-student batches exactly like cache-teacher)

    python bench/teacher_batch_sensitivity.py --shards TRAIN --teacher test_resnet --input-size 32

Replays every shard for one seed, runs the teacher once batched like cache-teacher (per shard, in
mixing order, --reference-batch images at a time) and again with other batch sizes over the
concatenated images (as a per-training-batch online teacher would), then counts the rows whose
fp32 logits differ in any bit, whose stored (fp16-rounded) top-k log-probs differ, whose top-k
classes differ and whose argmax differs.
"""
from __future__ import annotations

import argparse

import torch

from data_shards import AugRecipe, ShardSet, finish_item, replay_slice
from teacher_cache.targets import encode_teacher_logits
from teacher_cache.teacher import load_teacher, teacher_logits


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", required=True)
    p.add_argument("--teacher", default="test_resnet", help="timm name (random weights unless --teacher-checkpoint).")
    p.add_argument("--teacher-checkpoint", default=None)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--aug-seed", type=int, default=0)
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--reference-batch", type=int, default=64, help="cache-teacher's --batch-size.")
    p.add_argument("--batch-sizes", default="1,7,32,100,256")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    shard_set = ShardSet.open(args.shards)
    recipe = AugRecipe(input_size=args.input_size)
    if args.teacher_checkpoint:
        model = load_teacher(args.teacher, args.teacher_checkpoint, num_classes=shard_set.num_classes)
    else:
        import timm
        model = timm.create_model(args.teacher, num_classes=shard_set.num_classes).eval()
    shards = [shard_set.read_shard(shard) for shard in range(shard_set.num_shards)]
    units = [finish_item(replay_slice(samples, args.aug_seed, recipe, 0, len(samples)), recipe) for samples in shards]
    images = torch.cat(units)
    b = args.reference_batch
    reference = torch.cat([teacher_logits(model, u[i:i + b]) for u in units for i in range(0, len(u), b)])
    ref_targets = encode_teacher_logits(reference, args.topk)
    rows = []
    for size in (int(s) for s in args.batch_sizes.split(",")):
        other = torch.cat([teacher_logits(model, images[i:i + size]) for i in range(0, len(images), size)])
        targets = encode_teacher_logits(other, args.topk)
        row = {"batch": size, "rows": len(images),
               "logit_rows_bit_different": int((reference != other).any(dim=1).sum()),
               "max_abs_logit_diff": float((reference - other).abs().max()),
               "stored_topk_logprob_rows_different": int((ref_targets.topk_logprobs != targets.topk_logprobs).any(dim=1).sum()),
               "topk_class_rows_different": int((ref_targets.topk_indices != targets.topk_indices).any(dim=1).sum()),
               "argmax_different": int((ref_targets.label != targets.label).sum())}
        rows.append(row)
        print(f"batch {size:4d} vs per-unit {b}: logits differ in {row['logit_rows_bit_different']}/{row['rows']} rows "
              f"(max {row['max_abs_logit_diff']:.2e}); stored top-{args.topk} log-probs differ in "
              f"{row['stored_topk_logprob_rows_different']} rows, top-{args.topk} classes in "
              f"{row['topk_class_rows_different']}, argmax in {row['argmax_different']}")
    return rows


if __name__ == "__main__":
    main()

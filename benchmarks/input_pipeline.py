"""Input pipeline benchmark: images/s per DataLoader worker for the pretraining transform at
192 px from (a) an ImageFolder of full-size JPEGs and (b) prepare-data shards of the same
images, side by side, with the ratio and the workers per GPU each needs
(``star_mamba/tools/bench_input.py``; the same as ``star-mamba bench --data``).

    python benchmarks/input_pipeline.py [--output-dir benchmarks/results] [--quick]
"""
import argparse
import sys

from star_mamba.tools.bench_input import run_input_bench, to_markdown

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="a few images (a smoke run)")
    parser.add_argument("--images-per-class", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(to_markdown(run_input_bench(args.output_dir, args.images_per_class, quick=args.quick,
                                      repeats=args.repeats,
                                      command="python " + " ".join(sys.argv))), end="")

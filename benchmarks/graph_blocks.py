"""Nodes of the traced gradient step of N separate identical `ReversibleBlock`s, against N.

A user's list of identical blocks (one layer, and one set of variables, per block) runs as one loop
(`LoopUnit`), so the traced graph grows with N only by what each block's variables need: the
variable's capture and read, each weight's returned gradient and each statistic's assignment. This
script counts every node of the GraphDef (the function library included) of one gradient step
(`tf.GradientTape` through a functional model holding `ReversibleSequence(blocks)`, gradients of
every trainable variable) for each N, in this process (tracing only: nothing is run), and prints the
nodes added per block and per variable of a block, and the ratio of the largest N to the smallest.

    python benchmarks/graph_blocks.py                       # N = 4 and 16, 64 channels
    python benchmarks/graph_blocks.py --depths 4 16 64 --output benchmarks/results/graph_blocks.json
"""

import argparse
import json


def graph_nodes(n_blocks, channels):
    """(nodes of the traced step, variables of one block) for `n_blocks` separate blocks."""
    import keras
    import tensorflow as tf

    from tf_revnet.layers import BasicResidualFunction, ReversibleBlock, ReversibleSequence

    keras.utils.set_random_seed(0)
    blocks = [ReversibleBlock(BasicResidualFunction(), BasicResidualFunction())
              for _ in range(n_blocks)]
    inputs = keras.Input((8, 8, channels))
    model = keras.Model(inputs, ReversibleSequence(blocks)(inputs))

    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x, training=True) ** 2)
        return tape.gradient(loss, model.trainable_variables)

    spec = tf.TensorSpec((2, 8, 8, channels))
    graph_def = tf.function(step).get_concrete_function(spec).graph.as_graph_def()
    nodes = len(graph_def.node) + sum(len(f.node_def) for f in graph_def.library.function)
    return nodes, len(blocks[0].variables)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", nargs="+", type=int, default=[4, 16])
    parser.add_argument("--channels", type=int, default=64, help="Channels of x (both halves).")
    parser.add_argument("--output", help="Write the rows to this JSON file.")
    args = parser.parse_args(argv)
    rows = []
    for n in sorted(args.depths):
        nodes, variables = graph_nodes(n, args.channels)
        rows.append({"blocks": n, "nodes": nodes, "variables_per_block": variables})
    first, last = rows[0], rows[-1]
    per_block = (last["nodes"] - first["nodes"]) / max(last["blocks"] - first["blocks"], 1)
    summary = {"nodes_per_block": per_block,
               "nodes_per_variable": per_block / first["variables_per_block"],
               "ratio": last["nodes"] / first["nodes"]}
    print("| blocks | nodes |\n|---:|---:|")
    for row in rows:
        print(f"| {row['blocks']} | {row['nodes']:,} |")
    print(f"nodes per added block {per_block:.1f} ({summary['nodes_per_variable']:.2f} per variable "
          f"of a block); N={last['blocks']} / N={first['blocks']}: {summary['ratio']:.2f}x")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"rows": rows, **summary, "channels": args.channels}, f, indent=1)
    return rows, summary


if __name__ == "__main__":
    main()

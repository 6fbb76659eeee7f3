"""Prepares a TFDS data set once, as the ArrayRecord files that ``jaxdiff.data`` reads (no TensorFlow at run time).

    pip install -e ".[data]"
    python experiments/prepare_data.py --dataset mnist --data_dir ~/tensorflow_datasets
    TFDS_DATA_DIR=~/tensorflow_datasets python experiments/train.py \
        --config experiments/configs/mnist_vp_ddpmpp.py --workdir runs/mnist

Downloads the data set and writes it with ``tfds.builder(...).download_and_prepare(file_format="array_record")``.
Preparing (not reading) needs TensorFlow, which the ``data`` extra brings; this script is the TFDS Python API
without its command line, whose ``tfds build`` also imports Apache Beam in tensorflow-datasets 4.9. Run it on a
machine with internet access; copy ``DATA_DIR`` wherever the training runs.
"""

from __future__ import annotations

import os
import sys

import common
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "mnist", ["mnist", "fashion_mnist", "cifar10", "celeb_a"], "TFDS name")
flags.DEFINE_string("data_dir", None, "where to write (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")


def main(argv):
    common.parse_flags(argv)
    data_dir = os.path.expanduser(FLAGS.data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")
    try:
        import tensorflow  # noqa: F401 - preparing a TFDS data set needs it; reading it later does not
    except ImportError:
        raise common.ConfigError('preparing a TFDS data set needs TensorFlow: pip install -e ".[data]"') from None
    import tensorflow_datasets as tfds
    import workdir as wd

    wd.prepare_dir(data_dir, "--data_dir")
    builder = tfds.builder(FLAGS.dataset, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    print(f"prepared {FLAGS.dataset} in {data_dir}; set TFDS_DATA_DIR={data_dir} for the experiments")


if __name__ == "__main__":
    sys.exit(common.run_main(main))

"""Command line: each command parses its flags, resolves the config and calls one library function.

``train`` holds demo-data, fit, prepare and configs; ``use`` predict, evaluate, export and
explain; ``tools`` report, import-torch and bench; ``common`` the helpers they share.

May import: everything in tfcovid (the top layer), inside the command functions.
"""
# Commands import their library modules (and so TensorFlow, seconds to load) inside the command
# functions, never at the top of a module here: `tfcovid --help` and a usage error stay instant.
# Only click and tfcovid.config (PyYAML, no TensorFlow) load with the command line.

import click

from tfcovid.cli import tools, train, use
from tfcovid.cli.common import NOT_CLINICAL, quiet_tensorflow


@click.group(help=f"Fine-tune ImageNet backbones to classify chest X-rays. {NOT_CLINICAL}")
@click.version_option(package_name="tfcovid")
def main() -> None:
    quiet_tensorflow()


for _command in (train.demo_data, train.fit, train.prepare, train.configs, use.predict, use.evaluate,
                 use.export, use.explain, tools.report, tools.import_torch, tools.bench):
    main.add_command(_command)

from ldm.config_errors import describe_failure, summarize

NESTED = """Parser key "data":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'pytorch_lightning.core.datamodule.LightningDataModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'ldm.data.ShardDataModule':
        Parser key "batch_size":
          Expected a <class 'int'>. Got value: eight
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>
  Given value: NestedArg(key='batch_size', val='eight')"""

UNKNOWN = """Parser key "model":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'pytorch_lightning.core.module.LightningModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'tests.toy.ToySystem':
        Option 'chanels' is not accepted
    - Expected a <class 'NoneType'>
  Given value type: <class 'dict'>
  Given value: {'init_args': {'chanels': 4}}"""


def test_nested_type_error_becomes_a_dotted_key():
    assert summarize(NESTED) == ["data.init_args.batch_size: Expected a <class 'int'>. Got value: eight"]


def test_unknown_option_names_key_and_class():
    assert summarize(UNKNOWN) == ["model.init_args.chanels: unknown key (not a parameter of tests.toy.ToySystem)"]


def test_flat_messages():
    assert summarize('Parser key "config": File does not exist: \'x.yaml\'') == [
        "config: File does not exist: 'x.yaml'"]
    assert summarize("unrecognized arguments: --trainer.max_stepz=3") == []


def test_a_failure_is_blamed_on_the_key_it_names_or_quotes_but_not_on_a_plain_word():
    config = {"data": {"init_args": {"batch_size": 0, "train": "/x/train-*.tar"}},
              "run": {"log_checkpoints": "last", "name": "demo"}}
    assert describe_failure(ValueError("batch_size must be >= 1"), config) == \
        "data.init_args.batch_size: batch_size must be >= 1"
    assert describe_failure(FileNotFoundError("no shard matches /x/train-*.tar"), config) == \
        "data.init_args.train: no shard matches /x/train-*.tar"
    # a data-loader worker's error carries its traceback: "most recent call last" is not run.log_checkpoints
    worker = RuntimeError("Caught RuntimeError in DataLoader worker process 0. Original Traceback (most recent "
                          "call last): ... 50 shards in a row gave no usable sample")
    assert describe_failure(worker, config).startswith("RuntimeError: Caught RuntimeError in DataLoader worker")

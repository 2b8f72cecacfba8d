"""Data stage: prompt sources -> (backbone regeneration or dataset responses) -> packed Arrow rows.

    sources.py    read / normalize / dedup / mix / split prompt records
    templates.py  chat-template rendering and the assistant-token loss mask
    regen.py      Generator protocol, engine and HF implementations, sharded resumable regeneration
    pack.py       packing into seq_len rows, Arrow files, PackedDataset reader
    stage.py      run_data_stage: the whole stage into run_dir/data
    config.py     DataConfig
"""

from .config import ChatTemplateConfig, DataConfig, SourceConfig
from .pack import PackedDataset, pack, write_packed
from .regen import EngineGenerator, Generator, HFGenerator, load_responses, rank_world, regenerate
from .sources import BadRecordError, Record, load_sources
from .stage import check_accounting, run_data_stage, summary
from .templates import ChatRenderer, Encoded, TemplateError, mask_spans, show_mask

__all__ = [
    "BadRecordError", "ChatRenderer", "ChatTemplateConfig", "DataConfig", "Encoded", "EngineGenerator", "Generator",
    "HFGenerator",
    "PackedDataset", "Record", "SourceConfig", "TemplateError", "check_accounting", "load_responses",
    "load_sources", "mask_spans", "pack", "rank_world", "regenerate", "run_data_stage",
    "show_mask", "summary", "write_packed",
]

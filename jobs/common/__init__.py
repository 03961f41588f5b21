"""What both stages and the service share: the spec base (`spec`), the contract between stages
(`contract`: manifest, columns; `run_layout`: where a run keeps its files), storage, tokenizer
files and the Ray connection."""

"""A run's tokenizer and data: the chat format of its `data` section, the tokenizer prepared for it, and
the validated, tokenised records every trainer reads."""
from __future__ import annotations


def chat_format(data):
    """The `distalign.data.ChatFormat` of a DataConfig (`data.chat_template`, `data.system`)."""
    from distalign.data import ChatFormat
    return ChatFormat(data.chat_template, data.system, field_prefix="data.")


def load_run_tokenizer(model_cfg, data):
    """The run's tokenizer (`model.tokenizer`, else the model's), its EOS set to the token responses end with
    under the run's chat format, so data, samplers and the missing-EOS check agree (`data.chat`)."""
    from distalign.data import prepare_tokenizer
    from distalign.models import load_tokenizer
    tokenizer = load_tokenizer(model_cfg.tokenizer or model_cfg.name_or_path,
                               trust_remote_code=model_cfg.trust_remote_code)
    return prepare_tokenizer(tokenizer, chat_format(data))


def load_records(data, source: str, kind: str, tokenizer, log=print) -> list:
    """Validate and tokenise `source` as `kind` with the limits of a DataConfig `data`; log both reports.

    Every trainer reads its data through here, so errors, skipping and truncation counts are the same
    whichever method runs.
    """
    from distalign.data import load_examples, tokenize_examples
    examples, report = load_examples(source, kind, split=data.split, skip_invalid=data.skip_invalid)
    records, tok_report = tokenize_examples(examples, kind, tokenizer, max_prompt_length=data.max_prompt_length,
                                            max_length=data.max_length, skip_invalid=data.skip_invalid,
                                            source_name=source, chat=chat_format(data))
    # Tokenizing reads the rows validation kept: its report adds only what it skipped or truncated.
    tokenized = f"; tokenized: {tok_report.summary()}" if tok_report.rows_skipped or tok_report.truncated else ""
    log(f"{source}: {report.summary()}{tokenized}")
    if not records:
        raise ValueError(f"{source}: no usable {kind} after validation")
    return records

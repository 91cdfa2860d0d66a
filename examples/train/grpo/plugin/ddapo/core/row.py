"""A completion's row of the reward kwargs, typed: the columns the reward reads, by name."""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional


@dataclass(frozen=True)
class Row:
    """One completion's row of the reward kwargs, as ms-swift batched it (``RowPreprocessor.rows_to_batched`` of every
    sample's ``to_reward_row()``): the columns the reward reads, by name, and ``columns``, every column as passed (the
    template's encoding and the gate reward take them all).

    >>> row = Row({'prompt_id': 'p0', 'messages': [{'role': 'user', 'content': 'hi'}], 'solution': 'red'})
    >>> row.prompt_id, row.solution, row.images, row.request_id, len(row.messages)
    ('p0', 'red', [], None, 1)
    """
    columns: Mapping[str, Any] = field(repr=False)

    @property
    def messages(self) -> List[Dict[str, Any]]:
        return list(self.columns.get('messages') or [])

    @property
    def images(self) -> List[Any]:
        """As rows carry them: PIL images, paths, or ``{'bytes', 'path'}``."""
        return list(self.columns.get('images') or [])

    @property
    def response_token_ids(self) -> Any:
        """The generated ids: one list per generated turn, or one flat list."""
        return self.columns.get('response_token_ids')

    @property
    def prompt_id(self) -> Optional[str]:
        value = self.columns.get('prompt_id')
        return None if value in (None, '') else str(value)

    @property
    def request_id(self) -> Optional[str]:
        value = self.columns.get('request_id')
        return None if value in (None, '') else str(value)

    @property
    def solution(self) -> Optional[str]:
        value = self.columns.get('solution')
        return None if value is None else str(value)

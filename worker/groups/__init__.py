"""Group providers (OpenAI's Batch API): lines sent in groups, one provider job per group.

``form`` (the scheduler's part) takes READY lines into groups and dispatches each group's
due step; ``job`` runs that step (send, create or find, poll, collect); ``lines`` decides what
each answer means for its line; ``adopt`` puts groups found in the output store back after
Redis was lost. A group's job is persisted (``.state/groups/G.json``) before it is created
and found again by its metadata, never created twice.
"""

"""The Responses API's state at the ingress: the store (embedded or Redis), the expansion of a follow-up into
its whole conversation, and responses run in the background under a lease."""

"""AWS limits and protocol bounds, named once so every check quotes the same number."""

from __future__ import annotations

#: SQS long-poll maximum. https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/quotas-messages.html
MAX_WAIT_TIME_SECONDS = 20

#: SQS ReceiveMessage batch maximum (same quota page).
MAX_RECEIVE_BATCH = 10

#: SQS redrive policy: maxReceiveCount is 1..1000.
#: https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/sqs-dead-letter-queues.html
MAX_REDRIVE_RECEIVE_COUNT = 1000

#: SQS visibility timeout maximum: 12 hours (same quota page).
MAX_VISIBILITY_TIMEOUT_SECONDS = 12 * 60 * 60

#: SNS message size maximum, 256 KiB. https://docs.aws.amazon.com/general/latest/gr/sns.html
MAX_SNS_MESSAGE_BYTES = 256 * 1024

#: SQS queue names: at most 80 alphanumerics, hyphens and underscores.
#: https://docs.aws.amazon.com/AWSSimpleQueueService/latest/SQSDeveloperGuide/quotas-queues.html
MAX_QUEUE_NAME_LENGTH = 80

#: Our own bound on a deploy message; real ones are ~400 bytes, so anything near this is hostile.
MAX_DEPLOY_MESSAGE_BYTES = 16 * 1024

#: Bound on a manifest document; stretcher manifests are a few hundred bytes.
MAX_MANIFEST_BYTES = 256 * 1024

"""The only package that imports boto3 or botocore: clients, the one retry policy, thin adapters.

Above this package nothing sees a botocore exception: AWS failures leave as `AwsError` (or a
more precise error of the tree) once the retry policy has given up.
"""

